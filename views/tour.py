"""Guided tour: seven steps on the session's model, from a sentence going in to half the heads gone (ui.tour)."""

import streamlit as st

from ui.loaders import session_model_and_dev
from ui.tour import Tour, show

st.title("Guided tour")
show(Tour(*session_model_and_dev()))
