from django.contrib.auth import login
from django.contrib.auth.decorators import login_required
from django.shortcuts import redirect, render

from apps.conversations.selectors import cost_by_conversation_for_user, cost_totals_for_user

from .forms import SignUpForm
from .services import usage_days, usage_today


def signup(request):
    form = SignUpForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        user = form.save()
        login(request, user)
        return redirect("home")
    return render(request, "registration/signup.html", {"form": form})


USAGE_RECENT_CONVERSATIONS = 20
USAGE_RECENT_DAYS = 14


@login_required
def usage(request):
    user_id = request.user.pk
    days = usage_days(user_id=user_id, size=USAGE_RECENT_DAYS)
    context = {
        "account": request.user,
        "today": usage_today(user=request.user, days=days),
        "days": days,
        "totals": cost_totals_for_user(user_id=user_id),
        "recent": cost_by_conversation_for_user(user_id=user_id, size=USAGE_RECENT_CONVERSATIONS),
        "recent_size": USAGE_RECENT_CONVERSATIONS,
    }
    return render(request, "accounts/usage.html", context)
