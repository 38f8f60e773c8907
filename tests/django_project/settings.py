"""Minimal Django project serving webhook_view, for the tests and gunicorn.

The webhook's own settings (GITHUB_WEBHOOK_SECRET, DEPLOY_TRIGGER_FILE,
DEPLOY_BRANCH, DEPLOY_REPOSITORY) are deliberately absent: the view then
reads them from the environment, as it does in a container. Tests set them
per test with override_settings.
"""

SECRET_KEY = "tests-only-not-a-secret"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "testserver"]
ROOT_URLCONF = "tests.django_project.urls"
WSGI_APPLICATION = "tests.django_project.wsgi.application"
INSTALLED_APPS = []
# A typical stack, so the tests show csrf_exempt and the body handling hold
# with CSRF checks on.
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
]
USE_TZ = True
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"stderr": {"class": "logging.StreamHandler"}},
    "loggers": {"webhook_view": {"handlers": ["stderr"], "level": "INFO"}},
}
