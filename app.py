"""HeadLab: which attention heads matter, what they do, and what is left when the rest are pruned."""

import streamlit as st

from ui import presenter, report, share
from ui.jobs import cpu_queue_panel
from ui.network import warn_if_exposed

st.set_page_config(page_title="HeadLab", layout="wide")
warn_if_exposed()  # above every page
linked = share.restore()  # a shared link's view, once per session: the url_path of its page
cpu_queue_panel()  # in the sidebar of every page
# The pages live in views/, not pages/: Streamlit runs a file of a pages/ folder on its own (no navigation,
# sidebar or layout of this script) when a new server's first request names its URL, e.g. a shared /tour link.
tour = st.Page("views/tour.py", title="Guided tour", url_path="tour")
pages = [
    st.Page("views/model.py", title="Model", default=True),
    st.Page("views/heads.py", title="Heads"),
    st.Page("views/gates.py", title="Gates"),
    st.Page("views/prune.py", title="Prune"),
]
first_visit = not st.session_state.get("tour_seen")
page = st.navigation([tour, *pages] if first_visit else [*pages, tour])  # the tour leads until it is seen
if linked and linked != page.url_path:
    st.switch_page(next((p for p in [tour, *pages] if p.url_path == linked), pages[0]))
if page.url_path != "tour":
    st.sidebar.page_link(tour, label="New here? Take the guided tour" if first_visit else "Back to the guided tour",
                         icon=":material/school:")
presenter.toggle()
report.begin()
url = share.sync(page.url_path)
report.download_button(f"HeadLab: {page.title}", url, f"headlab-{page.url_path or 'model'}.html")
page.run()
