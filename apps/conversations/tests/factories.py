import factory
from django.db.models import F

from apps.accounts.tests.factories import UserFactory
from apps.conversations.models import Conversation, Message, TranscriptSegment
from apps.personas.tests.factories import PersonaFactory


class ConversationFactory(factory.django.DjangoModelFactory):
    """A conversation with no messages; `last_seq` follows MessageFactory's seqs."""

    class Meta:
        model = Conversation

    user = factory.SubFactory(UserFactory)
    persona = factory.SubFactory(PersonaFactory)


class MessageFactory(factory.django.DjangoModelFactory):
    """A stored turn; its seq is the conversation's next one (last_seq is kept in step)."""

    class Meta:
        model = Message

    conversation = factory.SubFactory(ConversationFactory)
    role = Message.Role.USER
    source = Message.Source.TEXT
    status = Message.Status.COMPLETE
    text = factory.Faker("sentence")

    @factory.lazy_attribute
    def seq(self):
        conversation = self.conversation
        Conversation.objects.filter(pk=conversation.pk).update(last_seq=F("last_seq") + 1)
        conversation.last_seq = Conversation.objects.values_list("last_seq", flat=True).get(
            pk=conversation.pk
        )
        return conversation.last_seq


class TranscriptSegmentFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = TranscriptSegment

    message = factory.SubFactory(MessageFactory, source=Message.Source.VOICE)
    conversation = factory.SelfAttribute("message.conversation")
    utterance_id = factory.Sequence(lambda n: f"utt{n:04d}")
    seq = factory.SelfAttribute("message.seq")
    start_ms = 0
    end_ms = 1500
    text = factory.SelfAttribute("message.text")
    provider = "faster_whisper"
