"""The users admin shows what each user's turns cost, with no query per user, and
its actions still work on the annotated list."""

from decimal import Decimal

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from apps.accounts.models import User
from apps.conversations.tests.factories import ConversationFactory, MessageFactory

from .factories import UserFactory, usage_of, usage_set

pytestmark = pytest.mark.django_db


@pytest.fixture
def admin_browser(client):
    client.force_login(UserFactory(username="root", is_staff=True, is_superuser=True))
    return client


def user_costing(*per_conversation: tuple[str, ...]) -> User:
    user = UserFactory()
    for costs_usd in per_conversation:
        conversation = ConversationFactory(user=user)
        for cost in costs_usd:
            MessageFactory(conversation=conversation, cost_usd=Decimal(cost))
    return user


def row_of(html: str, user: User) -> str:
    return html.split(f"/admin/accounts/user/{user.pk}/change/")[1].split("</tr>")[0]


def test_the_users_list_shows_each_users_total_over_their_conversations(admin_browser):
    ada = user_costing(("0.5", "0.25"), ("0.125",))
    bob = user_costing(("0.00000001",))
    eve = UserFactory()

    html = admin_browser.get("/admin/accounts/user/").content.decode()

    assert '<td class="field-cost_total">0.87500000</td>' in row_of(html, ada)
    assert '<td class="field-cost_total">0.00000001</td>' in row_of(html, bob)
    assert '<td class="field-cost_total">0.00000000</td>' in row_of(html, eve)


def test_the_users_list_runs_no_query_per_user(admin_browser):
    user_costing(("0.1",))
    with CaptureQueriesContext(connection) as few:
        assert admin_browser.get("/admin/accounts/user/").status_code == 200
    for _ in range(5):
        user_costing(("0.1", "0.2"), ("0.3",))

    with CaptureQueriesContext(connection) as more:
        html = admin_browser.get("/admin/accounts/user/").content.decode()

    assert html.count('<td class="field-cost_total">') == 7  # and root
    assert len(more) == len(few), [q["sql"] for q in more.captured_queries]


def test_a_users_page_shows_their_total(admin_browser):
    ada = user_costing(("0.5", "0.25"))

    html = admin_browser.get(f"/admin/accounts/user/{ada.pk}/change/").content.decode()

    assert '<div class="readonly">0.75000000</div>' in html


def test_reset_usage_still_works_on_the_annotated_list(admin_browser):
    ada = user_costing(("0.5",))
    usage_set(ada, audio_seconds=30, tokens=99)

    response = admin_browser.post(
        "/admin/accounts/user/",
        {"action": "reset_usage", "_selected_action": [ada.pk]},
    )

    assert response.status_code == 302
    assert usage_of(ada) == (0, 0)
