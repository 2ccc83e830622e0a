"""The real-service machinery lives in ``revline.localservices`` (the demo uses it too)."""

from revline.tools.localservices import *  # noqa: F403
