"""Prune page: launch CoFi / L0 / baseline / dense runs in the background, watch them live, export them."""

from __future__ import annotations

import shlex
from dataclasses import fields, replace

import pandas as pd
import plotly.express as px
import streamlit as st

from analysis.roles.survival import role_vs_free, survival_frame
from pruning.config import TrainConfig
from pruning.distributed import torchrun_command
from pruning.launch import launch, launch_command
from pruning.live import ManualGates
from pruning.methods import methods
from pruning.runs import RunStore
from ui.charts import (
    DRIFT_COLOURS,
    gate_grid,
    mark_pauses,
    pareto_chart,
    role_survival_chart,
    size_points,
    sparse_vs_dense_chart,
)
from ui.export import export_folder, export_panel
from ui.loaders import get_data, session_data_spec
from ui.notes import note
from ui.presenter import advanced, chart
from ui.report import keep_table
from ui.settings import own_fields_first, settings_inputs
from ui.share import remember_run_base

FIELDS = {f.name: f for f in fields(TrainConfig)}
COMMON = ("steps", "finetune_steps", "alpha_ce", "distill", "threads", "device",  # run settings on the form
          "tensorboard", "mlflow")
CURVES = {
    "accuracy": ["accuracy", "dense_accuracy"],
    "speedup (batch 32 / batch 1, measured)": ["speedup_b32", "speedup_b1", "flop_speedup"],
    "sparsity": ["expected_sparsity", "sparsity", "target"],
    "losses": None,  # every loss term the method logs (loss_<name>)
    "method's figures": None,  # e.g. CoFi's Lagrange multipliers lambda_1, lambda_2
    "faithfulness to the dense model": list(DRIFT_COLOURS),  # explanation drift (analysis.drift), when recorded
}

st.title("Prune")
spec, data_spec = st.session_state.get("model_spec", "default"), session_data_spec()
store = RunStore()

with st.expander("New run", expanded=not store.list()):
    known = methods()
    method = st.selectbox("Method", list(known), key="prune_method", format_func=lambda m: f"{m}: {known[m].summary}")
    cls = known[method]
    with st.form("new_run"):
        st.caption(f"**{method}** options")
        options = settings_inputs(own_fields_first(cls.Options), key=f"opt_{method}")
        st.caption("Run")
        common = settings_inputs([FIELDS[name] for name in COMMON if cls.learned or name != "steps"], key="run")
        c1, c2, c3 = st.columns(3)
        teacher = c1.text_input("Teacher (blank: the model itself)", "", help=FIELDS["teacher"].metadata["help"] +
                                ". E.g. `default` with model `minilm-l3` and method dense: the small-dense comparison.")
        processes = c2.number_input("Processes (torchrun)", 1, 64, 1, help="Data-parallel processes on this machine "
                                    "(DistributedDataParallel; batch size is the global batch). The command is shown "
                                    "below the run, to run it on a cluster by hand.")
        dev = get_data(replace(data_spec, whole_file=False))
        st.caption(f"Model `{spec}`, data `{data_spec.path}` (chosen on the Model page): a run trains on its train "
                   f"split and evaluates on the {dev.selection if dev else 'dev split'}. One run trains at a time; "
                   "runs started meanwhile wait in the queue.")
        if st.form_submit_button("Start run"):
            try:
                config = TrainConfig.build(model=spec, teacher=teacher.strip(), **TrainConfig.data_fields(data_spec),
                                           method=method, **common, **options).check()
                run_id = store.create(config.to_dict())
                launch(store, run_id, processes=int(processes))
                st.session_state.update(prune_run=run_id)
            except ValueError as exc:
                st.error(str(exc))

runs = store.list()


def rerun_if_runs_changed() -> None:
    """Runs started elsewhere (the CLI, another tab) or deleted: rerun the page so the run picker sees them."""
    if [r.id for r in store.list()] != [r.id for r in runs]:
        st.rerun()


@st.fragment(run_every=2.0)
def overview() -> None:
    """The runs table (or the empty-store hint), polled while no run is selected."""
    rerun_if_runs_changed()
    if runs:
        st.dataframe(_runs_table(), hide_index=True, width="stretch")
    else:
        st.info("No runs yet: configure one above. Runs are kept in the run store and survive restarts.")


def _runs_table() -> pd.DataFrame:
    rows = []
    for r in store.list():
        final = r.final
        rows.append({"id": r.id, "status": r.status, "method": r.config.get("method"),
                     "model": r.config.get("model"), "teacher": r.config.get("teacher") or r.config.get("model"),
                     "target": TrainConfig.target_of(r.config),
                     "step": f"{r.step}/{r.total}", "accuracy": final.accuracy if final else None,
                     "speedup b32": final.speedup_b32 if final else None, "message": r.error or r.message})
    return pd.DataFrame(rows)


@st.fragment(run_every=1.0)
def live(run_id: int) -> None:
    """Everything that changes while a run trains, redrawn every second without rerunning the page."""
    rerun_if_runs_changed()
    st.dataframe(_runs_table(), hide_index=True, width="stretch")
    run = store.get(run_id)
    if run.active:
        st.progress(run.step / max(run.total, 1), text=f"Run {run.id} {run.status}: {run.message} "
                                                       f"(step {run.step}/{run.total})")
    elif run.status in ("failed", "interrupted"):
        st.error(f"Run {run.id} {run.status}: {run.error}")
    records = store.records(run_id)
    if not records:
        st.caption("Waiting for the first eval step...")
        return
    rows = pd.DataFrame([r.row() for r in records])
    dynamic = {"losses": sorted({f"loss_{k}" for r in records for k in r.losses}),
               "method's figures": sorted({k for r in records for k in r.method_figures})}
    cols = st.columns(2)
    for i, (title, keys) in enumerate(CURVES.items()):
        present = [k for k in keys or dynamic[title] if k in rows and rows[k].notna().any()]
        if present:
            fig = px.line(rows, x="step", y=present, markers=True, title=title)
            fig.update_layout(height=300, margin=dict(l=10, r=10, t=40, b=10), legend_title_text="")
            if title == "accuracy":
                fig.update_yaxes(range=[0, 1], tickformat=".0%")
            mark_pauses(fig, rows)
            chart(fig, f"curve-{title}", cols[i % 2])
    keep_table(f"Run {run_id}: eval steps", rows)
    last = records[-1]
    st.caption(f"Last eval (step {last.step}): {last.note} Accuracy {last.accuracy:.1%} (dense "
               f"{last.dense_accuracy:.1%}), batch 32 {last.speedup_b32:.2f}× faster, sparsity {last.sparsity:.1%}. "
               f"Measured on {last.device} with {last.threads} thread(s) per process, {last.processes} process(es).")
    note("run_curves")


def run_name(run) -> str:
    """"3: cofi 0.6" (id, method, target)."""
    target = TrainConfig.target_of(run.config)
    return f"{run.id}: {run.config.get('method')}" + (f" {target}" if target is not None else "")


labels = {r.id: run_name(r) + (f" ({r.final.accuracy:.1%}, {r.final.speedup_b32:.2f}×)" if r.result else "")
          for r in runs}  # a finished run with its full-dev accuracy and batch-32 speedup
run_id = st.selectbox("Run", list(labels), index=None, format_func=labels.get, key="prune_run",
                      placeholder="choose a run")
if run_id is None:
    overview()
    st.stop()
run = store.get(run_id)
c1, c2, c3 = st.columns(3)
if c1.button("Stop", disabled=not run.active, width="stretch"):
    store.request_stop(run_id)
if c2.button("Resume", disabled=run.active or run.status == "done", width="stretch"):
    launch(store, run_id, processes=run.processes)
if c3.button("Delete", disabled=run.active, width="stretch"):
    store.delete(run_id)
    st.session_state.pop("prune_run", None)
    st.rerun()
live(run_id)
with advanced("Command line", "command_line"):
    st.caption("What the page ran (resume uses the same), and the same configuration as a fresh run, e.g. on a "
               "cluster node (replace `--standalone` by torchrun's `--nnodes` / `--rdzv-endpoint` options):")
    st.code(shlex.join(launch_command(run_id, processes=run.processes)), language="bash")
    fresh = ["pruning", "train", *TrainConfig.from_dict(run.config).cli_args()]
    st.code(shlex.join(torchrun_command(fresh, run.processes) if run.processes > 1 else ["python", "-m", *fresh]),
            language="bash")

steps = store.gate_steps(run_id)
if steps:
    st.subheader("Head gates over the steps")
    step = st.select_slider("Step", steps, value=steps[-1], key=f"gate_step_{run_id}")
    state = store.gates(run_id, step)
    chart(gate_grid(tuple(state.head.shape), state.head.numpy(), set(state.closed_heads()),
                    f"Run {run_id}, step {step}: head gate values (✕ closed)"), "run_gates")
    note("run_gates")
    if st.button(f"Open step {step} in Gates", help="The Gates page then works on this run's model and data"):
        config = TrainConfig.from_dict(run.config)
        st.session_state.update(model_spec=config.model, data_spec=config.data_spec,
                                gates_from_run=ManualGates.from_state(state), gates_what=f"run {run_id} step {step}")
        remember_run_base(st.session_state["gates_from_run"], run_id, step)
        st.switch_page("views/gates.py")
    if st.toggle("Role survival: heads kept per role vs sparsity", key=f"role_survival_{run_id}",
                 help="Which Voita / Olsson roles the run keeps at each step, from the Heads analysis of the dense "
                      "model on the run's data (Heads or Gates page; the latest one found is used)"):
        from ui.gates import find_report
        from ui.loaders import get_model

        config = TrainConfig.from_dict(run.config)
        dense_model, dev_data = get_model(config.model), get_data(config.data_spec)
        report = find_report(dense_model, dev_data) if dense_model and dev_data else None
        if report is None:
            st.info(f"No Heads analysis of {config.model} on this data yet: run it on the Heads page first.")
        else:
            sparsity = {r.step: r.sparsity for r in store.records(run_id)}
            frame = survival_frame({s: store.gates(run_id, s) for s in steps}, report.table)
            frame["sparsity"] = frame["step"].map(sparsity)
            st.plotly_chart(role_survival_chart(frame, f"Run {run_id}: role heads kept"), key="role_survival")
            kept_roles, kept_free = role_vs_free(store.gates(run_id, steps[-1]), report.table)
            st.caption(f"At step {steps[-1]}: {kept_roles:.0%} of the role-bearing heads and {kept_free:.0%} of the "
                       "role-free heads are kept (Voita et al. 2019: specialised heads are pruned last, i.e. the "
                       "first share stays above the second). Roles from the dense model's Heads analysis.")

def export_section(run_id: int) -> None:
    """Export a finished run's model (folder + ONNX) as a background job, refusing to overwrite."""
    st.subheader("Export the final model")
    final = run.final
    st.caption(f"Run {run_id}'s final model, in {final.export}: {final.note} {final.parameters / 1e6:.2f} M "
               f"parameters; accuracy {final.accuracy:.1%} on {final.examples} dev examples.")
    out = export_folder(f"run-{run_id}-{final.method}", f"export_name_{run_id}")
    if out is None:
        return
    job = f"export-run-{run_id}-{out.name}"
    export_panel(out, job, ["pruning", "runs", "export", str(run_id), "--out", str(out), "--onnx", "--job", job],
                 f"Export run {run_id} as {out.name} (folder + ONNX)")

if run.status == "done":
    export_section(run_id)

finished = [(r, r.final) for r in runs if r.status == "done" and r.result]
if finished:
    st.subheader("Pareto")
    pareto = pd.DataFrame([{"label": run_name(r), "method": final.method,
                            "model": r.config.get("model"), "teacher": r.config.get("teacher") or r.config.get("model"),
                            "accuracy": final.accuracy, "dense_accuracy": final.dense_accuracy,
                            "speedup_b32": final.speedup_b32, "sparsity": final.sparsity,
                            **{k: getattr(final, k) for k in DRIFT_COLOURS}} for r, final in finished])
    drifted = [k for k in DRIFT_COLOURS if pareto[k].notna().any()]
    colour = st.selectbox("Colour by", [None, *drifted], key="pareto_colour",
                          format_func=lambda k: "method" if k is None else f"faithfulness: {DRIFT_COLOURS[k]}",
                          help="The third axis: how far each run's explanations drifted from the dense model's "
                               "(recorded at its final eval on its first drift_examples dev texts)")
    chart(pareto_chart(pareto, colour), "pareto")
    note("pareto")
    keep_table("Pareto: finished runs", pareto)
    st.caption("Each run's speedup is timed interleaved with its teacher in the run's own process, so runs "
               "measured at different times compare; the dense teacher sits at 1×. Baselines and dense "
               "(small-dense) runs appear next to the learned methods.")
    sizes = size_points(finished, run_name)
    st.subheader("Large-sparse vs small-dense (Zhu & Gupta 2017)")
    if sizes is None:
        st.info("Needs finished runs with the same teacher, e.g. `gradual` (weights) at a few targets and a `dense` "
                "run of model `minilm-l3` with teacher `default`: the small-dense model of about the same size.")
    else:
        chart(sparse_vs_dense_chart(sizes), "sparse_vs_dense")
        st.caption(f"Runs with teacher `{sizes['teacher'].iloc[0]}`. Zhu & Gupta found large-sparse models beat "
                   "small-dense ones at equal non-zero parameters; on the CPU's dense kernels masked weights buy "
                   "no speed, so at equal latency the comparison is with the structured and small-dense runs.")
