"""WSGI entry point: gunicorn --chdir <repo> tests.django_project.wsgi"""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.django_project.settings")
application = get_wsgi_application()
