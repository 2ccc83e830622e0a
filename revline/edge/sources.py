"""The sources ``revline edge`` reads, chosen by its settings: one engine source, maybe GPS.

Engine: ``sim`` (the driving simulator), ``obd`` (python-OBD on a serial or RFCOMM port) or
``ble`` (a BLE ELM327 bridged to a pty, then the same OBD code). GPS: ``gpsd`` or ``nmea``
(serial), or ``none``. Modules are imported only for the sources in use, so a simulator run does
not load python-OBD or bleak.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from revline.settings import ConfigError

if TYPE_CHECKING:
    from revline.edge.config import EdgeSettings
    from revline.edge.reading import Source

__all__ = ["open_sources"]


def _obd_options(settings: EdgeSettings) -> dict[str, Any]:
    from revline.edge.obd_source import unknown_pids  # noqa: PLC0415

    for key in ("obd_fast_pids", "obd_slow_pids", "obd_extra_pids"):
        unknown = unknown_pids(getattr(settings, key))
        if unknown:
            raise ConfigError(
                key, "", f"unknown python-OBD command name(s) {', '.join(unknown)}; "
                "expected names such as RPM, SPEED, COOLANT_TEMP"
            )
    return {
        "baudrate": settings.obd_baudrate,
        "fast_pids": settings.obd_fast_pids,
        "slow_pids": settings.obd_slow_pids,
        "extra_pids": settings.obd_extra_pids,
        "fast_hz": settings.fast_hz,
        "slow_every_s": settings.slow_every_s,
    }


def open_sources(settings: EdgeSettings) -> list[Source]:
    """The configured sources, not yet entered; ConfigError names a key that cannot work."""
    sources: list[Source] = []
    if settings.source == "sim":
        from revline.edge.sim import SimSource  # noqa: PLC0415

        sources.append(
            SimSource(hz=settings.sim_hz, seed=settings.sim_seed, speedup=settings.sim_speedup)
        )
    elif settings.source == "obd":
        from revline.edge.obd_source import ObdSource  # noqa: PLC0415

        sources.append(ObdSource(port=settings.obd_port, **_obd_options(settings)))
    else:
        from revline.edge.ble import BleTransport, BridgedObdSource  # noqa: PLC0415

        options = _obd_options(settings)
        options.pop("baudrate")  # a pty has no baud rate
        address, name = settings.ble_address, settings.ble_name
        sources.append(
            BridgedObdSource(lambda: BleTransport(address=address, name=name), **options)
        )

    if settings.gps == "gpsd":
        from revline.edge.gps import GpsdSource  # noqa: PLC0415

        sources.append(GpsdSource(host=settings.gpsd_host, port=settings.gpsd_port))
    elif settings.gps == "nmea":
        from revline.edge.gps import NmeaSource  # noqa: PLC0415

        sources.append(NmeaSource(device=settings.gps_device, baudrate=settings.gps_baudrate))
    return sources
