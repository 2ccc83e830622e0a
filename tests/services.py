"""The real-service machinery lives in ``revline.localservices`` (the demo uses it too)."""

from revline.localservices import *  # noqa: F403
