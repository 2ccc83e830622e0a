"""The subscriber's shortcuts through paho's private parts hold for the paho installed."""

from __future__ import annotations

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from revline.consumer import subscriber
from revline.consumer.subscriber import PAHO_HOOKS


def test_the_installed_paho_has_every_private_part_the_subscriber_uses() -> None:
    """An upgrade of paho that renames one fails here, not in production (where the subscriber
    would fall back to paho's public, slower behaviour)."""
    client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    missing = [name for name in PAHO_HOOKS if not hasattr(client, name)]
    assert missing == []
    assert subscriber._PAHO_HOOKS
