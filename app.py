"""HeadLab: which attention heads matter, what they do, and what is left when the rest are pruned."""

import streamlit as st

from ui.jobs import cpu_queue_panel
from ui.network import warn_if_exposed

st.set_page_config(page_title="HeadLab", layout="wide")
warn_if_exposed()  # above every page
cpu_queue_panel()  # in the sidebar of every page
st.navigation([
    st.Page("pages/model.py", title="Model", default=True),
    st.Page("pages/heads.py", title="Heads"),
    st.Page("pages/gates.py", title="Gates"),
    st.Page("pages/prune.py", title="Prune"),
]).run()
