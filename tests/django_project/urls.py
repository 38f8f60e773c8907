"""The one URL a user adds for the webhook."""

from django.urls import path

import webhook_view

urlpatterns = [path("webhook/", webhook_view.github_webhook)]
