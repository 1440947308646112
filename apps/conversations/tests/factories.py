import factory
from django.db.models import Max

from apps.accounts.tests.factories import UserFactory
from apps.conversations import context
from apps.conversations.models import Conversation, Message, TranscriptSegment
from apps.personas.tests.factories import PersonaFactory


class ConversationFactory(factory.django.DjangoModelFactory):
    """A conversation with no messages."""

    class Meta:
        model = Conversation

    user = factory.SubFactory(UserFactory)
    persona = factory.SubFactory(PersonaFactory)


class MessageFactory(factory.django.DjangoModelFactory):
    """A stored turn; its seq is the conversation's next one. Like the services,
    it tells the context cache (a new generation of the conversation's history)."""

    class Meta:
        model = Message

    conversation = factory.SubFactory(ConversationFactory)
    role = Message.Role.USER
    source = Message.Source.TEXT
    status = Message.Status.COMPLETE
    text = factory.Faker("sentence")

    @factory.lazy_attribute
    def seq(self):
        highest = Message.objects.filter(conversation=self.conversation).aggregate(Max("seq"))
        return (highest["seq__max"] or 0) + 1

    @classmethod
    def _create(cls, model_class, *args, **kwargs):
        message = super()._create(model_class, *args, **kwargs)
        context.history_forget(conversation_id=message.conversation_id)
        return message


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
