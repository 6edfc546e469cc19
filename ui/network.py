"""The banner that says when the app listens beyond this machine."""

from __future__ import annotations

import streamlit as st

LOCAL_ADDRESSES = ("127.0.0.1", "localhost", "::1")  # server.address values only this machine can reach


def warn_if_exposed() -> None:
    """A warning at the top of the page when `server.address` is set to anything but a loopback address.

    `.streamlit/config.toml` binds to 127.0.0.1; this shows when a user overrode it (e.g.
    `--server.address 0.0.0.0`), because then anyone on the network can use the app and its jobs.
    """
    address = st.get_option("server.address")
    if address not in LOCAL_ADDRESSES:
        st.warning(f"HeadLab is listening on {address or 'all interfaces'}, not only on this machine: anyone who "
                   "can reach it can read your models and data and start jobs. Restart it without "
                   "--server.address or STREAMLIT_SERVER_ADDRESS (it then binds to 127.0.0.1).", icon="⚠️")
