"""Gates page: switch heads, sublayers, FFN units and hidden dims off and watch accuracy and latency."""

from __future__ import annotations

import os
from dataclasses import replace

import numpy as np
import pandas as pd
import streamlit as st

from analysis.heads import report_dir
from analysis.roles.survival import least_relevant_role_free
from core.jobs import cancel_job, job_state
from core.latency import threads_leaving_a_core
from pruning.live import ManualGates, heads_without_role, least_relevant_heads
from pruning.standard_export import round_to_standard
from ui import gates as g
from ui.charts import gate_grid, history_chart
from ui.export import export_folder, save_panel
from ui.jobs import ensure_job, wait_for
from ui.loaders import session_model_and_dev
from ui.notes import note
from ui.presenter import chart
from ui.report import keep_table
from ui.share import remember_run_base

COLOURS = {"relevance": "LRP relevance", "importance": "Michel importance", "confidence": "confidence",
           "roles": "role"}

st.title("Gates")
spec, data_spec, loaded, data = session_model_and_dev()
if st.session_state.get("gates_model") != loaded.fingerprint:  # another model: its own gates
    incoming = st.session_state.pop("gates_from_run", None)  # "open in Gates" from the Prune page
    st.session_state.update(gates=incoming or ManualGates(), gates_undo=[], gates_history=[],
                            gates_model=loaded.fingerprint)
elif "gates_from_run" in st.session_state:
    g.apply(st.session_state.pop("gates_from_run"), st.session_state.get("gates_what", "from a run"))
subset = data.subset(g.subset_size(loaded), seed=0)
arch = loaded.architecture()
layers, heads = arch.layers, arch.heads
gates = g.current()

# ----------------------------------------------------------------------------- live figures
digest, state_file = g.gates_file(loaded, gates)
refining = st.session_state.get("gates_refining")
if refining and not refining.startswith(f"gates-eval-{digest}-"):
    cancel_job(refining)  # an earlier change's full-dev job: stale, and it would slow the timing below
    st.session_state.pop("gates_refining")
result = g.measure(loaded, gates, subset)
dense, pruned = result.dense, result.pruned
cols = st.columns(6)
cols[0].metric(f"Accuracy ({len(subset)} dev)", f"{pruned.accuracy:.1%}",
               f"{(pruned.accuracy - dense.accuracy) * 100:+.1f} pts", help=f"dense {dense.accuracy:.1%}")
cols[1].metric("Latency, batch 1", f"{pruned.latency_b1_ms:.1f} ms", f"{result.speedup(1):.2f}× faster",
               delta_color="normal" if result.speedup(1) >= 1 else "inverse",
               help=f"dense {dense.latency_b1_ms:.1f} ms, timed when the page opened and the pruned copy after "
                    f"the change, both in this process on {threads_leaving_a_core()} thread(s) (one core stays "
                    "with the app and the browser) with background work paused; the full-dev figures below time "
                    "both interleaved")
big = result.large_batch  # 32, or 8 for a decoder
cols[2].metric(f"Latency, batch {big}", f"{getattr(pruned, f'latency_b{big}_ms'):.0f} ms",
               f"{result.speedup(big):.2f}× faster", delta_color="normal" if result.speedup(big) >= 1 else "inverse",
               help=f"dense {getattr(dense, f'latency_b{big}_ms'):.0f} ms; FLOPs alone predict "
                    f"{result.flop_speedup:.2f}×")
stack = "Decoder" if loaded.is_decoder else "Encoder"
removed = dense.parameters - pruned.parameters  # exact: closing one BERT head removes 4 d d_head + 3 d_head
cols[3].metric("Parameters", f"{pruned.parameters / 1e6:.2f} M",
               f"-{removed:,} ({pruned.parameters / dense.parameters:.1%})" if removed else None, delta_color="off",
               help=f"{stack.lower()} layers {pruned.encoder_parameters / 1e6:.2f} M of "
                    f"{dense.encoder_parameters / 1e6:.2f} M; the token table is pruned only with hidden dims")
cols[4].metric(f"{stack} GFLOPs / example", f"{pruned.flops / 1e9:.3f}", f"{pruned.flops / dense.flops:.0%} of dense",
               delta_color="off", help=f"at {result.seq_len} tokens (the subset's median)")
cols[5].metric("Sparsity (CoFi)", f"{result.sparsity:.1%}",
               help=f"share of the {stack.lower()} layers' prunable weights removed")
share = pruned.flops_attention / max(pruned.flops, 1)
st.caption(f"{result.note} FLOPs split: attention {share:.0%}, FFN {1 - share:.0%} (dense: "
           f"{dense.flops_attention / dense.flops:.0%} / {dense.flops_ffn / dense.flops:.0%}) — with short inputs most "
           f"compute is in the FFN, so closing heads alone cannot buy much speed. Measured in {result.seconds:.1f} s.")
if gates != ManualGates() and (not loaded.is_decoder or st.button(
        "Compare the explanations with the dense model's", help=f"LRP of {g.DRIFT_EXAMPLES} prompts through both "
        "models: several seconds for a decoder, so it waits for this button")):
    why = g.explanation_drift(loaded, gates, subset)
    st.caption(f"Faithfulness to the dense model's reasons ({why.examples} dev texts, LRP, the dense model's class): "
               f"token relevance Spearman {why.token_spearman:.2f}, top-{why.top_k} token overlap "
               f"{why.token_topk:.0%}, "
               f"head relevance Spearman over the {why.heads_compared} kept heads {why.head_spearman:.2f}, "
               f"explanations flipped {why.flipped:.0%} (the dense model itself: 1.00, 100%, 1.00, 0%).")
if not loaded.is_decoder and st.toggle("int8: the pruned model dynamically quantised", key="gates_int8",
                                      help="torch's dynamic int8 quantisation of every Linear of the pruned copy "
                                      "(pruning.int8), timed against its fp32 self; pruning and quantisation compose"):
    with st.spinner("Quantising and timing the pruned model..."):
        int8 = g.int8_figures(loaded, gates, subset)
    frame = pd.DataFrame([{"model": v.name, "accuracy": v.accuracy, "agrees with fp32": v.agreement,
                           "max |dlogit|": v.max_logit_diff, **{f"ms batch {b}": ms for b, ms in v.latency_ms.items()},
                           "size MB": v.size_bytes / 1e6} for v in int8.variants])
    st.dataframe(frame, hide_index=True)
    keep_table("int8 vs fp32 (the pruned model)", frame)
    st.caption(f"On {int8.examples} rows of {int8.data}, {int8.threads} thread(s). The exports write the ONNX "
               "Runtime int8 copy with `--int8` (`pruning apply`, `pruning runs export`).")
note("live_figures")
keep_table("Live figures: dense vs pruned", pd.DataFrame([dense.__dict__, pruned.__dict__], index=["dense", "pruned"])
           .reset_index(names="model"))

if os.getloadavg()[0] > (os.cpu_count() or 1):
    st.warning(f"The machine is busy (load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores): latencies are "
               "inflated and their ratios noisy.")

history = st.session_state.setdefault("gates_history", [])
if not history or history[-1]["gates"] != gates:
    history.append({"step": len(history), "what": st.session_state.get("gates_what", "dense"), "gates": gates,
                    "accuracy": pruned.accuracy, "latency_ms": getattr(pruned, f"latency_b{big}_ms"),
                    "batch": big, "sparsity": result.sparsity})

st.caption(f"Accuracy on {len(subset)} seeded rows of {data_spec.caption(data)}")

# ----------------------------------------------------------------------------- switches
report = g.find_report(loaded, data)
left, right = st.columns([3, 2])
with left:
    colour = st.radio("Colour heads by", list(COLOURS), format_func=COLOURS.get, horizontal=True, key="gates_colour",
                      disabled=report is None)
    values = roles = None
    if report is not None and colour == "roles":
        roles = report.table
    elif report is not None:
        values = report.table.pivot(index="layer", columns="head", values=colour).sort_index().to_numpy(float)
    else:
        folder = report_dir(loaded.fingerprint, data.fingerprint(), 500, None)
        job = f"heads-{folder.name}"
        if job_state(job) is not None or st.button("Compute head relevance and roles (about a minute)",
                                                   help="Colours the grid and enables the presets. Timings taken "
                                                        "while it runs are inflated."):
            ensure_job(job, ["analysis", "heads", "--model", spec, *data_spec.cli_args(), "--limit", "500",
                             "--out", str(folder), "--job", job])
            wait_for(job, "Heads analysis", lambda: (folder / "heads.csv").exists())
    grid_key = f"gate_grid_{st.session_state.get('gate_grid_n', 0)}"
    event = chart(gate_grid((layers, heads), values, set(gates.closed_heads), "Heads: click to close / open",
                            roles=roles), grid_key, on_select="rerun", selection_mode="points")
    note("gate_grid")
    points = event.selection.points if event and event.selection else []
    if points:
        layer, head = points[0]["customdata"]
        g.toggle_head(int(layer), int(head))
        st.session_state["gate_grid_n"] = st.session_state.get("gate_grid_n", 0) + 1  # a fresh, unselected chart
        st.rerun()
    sublayers = pd.DataFrame({"attention": [i not in gates.attention_off for i in range(layers)],
                              "FFN": [i not in gates.ffn_off for i in range(layers)]},
                             index=[f"layer {i}" for i in range(layers)])
    edited = st.data_editor(sublayers, key=f"sublayers_{len(st.session_state.get('gates_undo', []))}",
                            column_config={c: st.column_config.CheckboxColumn(c) for c in sublayers})
    off = {c: frozenset(np.flatnonzero(~edited[c].to_numpy(bool)).tolist()) for c in sublayers}
    if (off["attention"], off["FFN"]) != (gates.attention_off, gates.ffn_off):
        g.apply(replace(gates, attention_off=off["attention"], ffn_off=off["FFN"]), "sublayer switch")
        st.rerun()

with right:
    ffn_keep = st.slider("FFN units kept (every layer)", 0.05, 1.0, gates.ffn_keep, 0.05, format="%.2f")
    hidden_keep = st.slider("Hidden dims kept (shared)", 0.25, 1.0, gates.hidden_keep, 0.05, format="%.2f")
    criterion = st.selectbox("Units chosen by", ["magnitude", "random"], index=["magnitude", "random"].index(
        gates.criterion), help="magnitude: norms of the weights a unit reads and writes; random: seeded draw")
    if (ffn_keep, hidden_keep, criterion) != (gates.ffn_keep, gates.hidden_keep, gates.criterion):
        g.apply(replace(gates, ffn_keep=ffn_keep, hidden_keep=hidden_keep, criterion=criterion), "slider")
        st.rerun()
    st.subheader("Presets")
    k = st.number_input("k", 1, layers * heads - 1, min(24, layers * heads - 1), key="preset_k",
                        disabled=report is None)
    if st.button(f"Close the {k} least relevant heads", disabled=report is None, width="stretch"):
        g.apply(replace(gates, closed_heads=least_relevant_heads(report.table, int(k))), f"close {k} least relevant")
        st.rerun()
    if st.button("Keep only role-bearing heads", disabled=report is None, width="stretch"):
        g.apply(replace(gates, closed_heads=heads_without_role(report.table)), "keep role-bearing heads")
        st.rerun()
    if st.button(f"Close {k} heads, role-free first", disabled=report is None, width="stretch",
                 help="Protect role-bearing heads: the least relevant heads without a role, then (past them) the "
                      "least relevant role heads"):
        g.apply(replace(gates, closed_heads=least_relevant_role_free(report.table, int(k))),
                f"close {k}, role-free first")
        st.rerun()
    if report is None:
        st.caption("The first three presets need the Heads analysis (button on the left).")
    if not loaded.is_decoder:
        speed_col, go_col = st.columns(2)
        target = speed_col.number_input("Target speed-up", 1.1, 8.0, 1.5, 0.1, format="%.1f", key="preset_speedup",
                                        help="ZipLM (Kurtic et al. 2023): a latency table measured on this machine "
                                             "(cached), OBS saliencies on training texts, then the structure whose "
                                             "predicted batch-32 speed-up meets the target")
        if go_col.button(f"ZipLM structure for {target:.1f}×", width="stretch", key="preset_ziplm"):
            st.session_state["ziplm_target"] = float(target)
        wanted = st.session_state.get("ziplm_target")
        if wanted is not None:
            state = g.speedup_preset(spec, data_spec, loaded, data, wanted)
            if state is not None:
                st.session_state.pop("ziplm_target")
                g.apply(ManualGates.from_state(state), f"ZipLM {wanted:.1f}×")
                st.rerun()
        st.caption("The ZipLM preset gates the structure only; a `ziplm` run on the Prune page also updates the "
                   "remaining weights (OBS) and distils.")
    runs = g.runs_with_gates(spec)
    if runs:
        run_col, step_col = st.columns(2)
        run_id = run_col.selectbox("Run", list(runs), format_func=runs.get, key="preset_run")
        step = step_col.selectbox("Step", g.run_steps(run_id), index=None, placeholder="latest", key="preset_step")
        if st.button(f"Load gates from run {run_id}" + (f" at step {step}" if step is not None else ""),
                     width="stretch"):
            g.apply(ManualGates.from_state(g.run_gates(run_id, step)), f"run {run_id} step {step or 'latest'}")
            remember_run_base(g.current(), run_id, step if step is not None else g.run_steps(run_id)[-1])
            st.rerun()
    else:
        st.caption("Gates of training runs (the Prune backend) can be loaded here once a run has some.")
    undo_col, reset_col = st.columns(2)
    if undo_col.button("Undo", disabled=not st.session_state.get("gates_undo"), width="stretch"):
        g.undo()
        st.rerun()
    if reset_col.button("Reset", disabled=gates == ManualGates(), width="stretch"):
        g.reset()
        st.rerun()

# ----------------------------------------------------------------------------- full dev set, in the background
refined = g.refined(digest, data)
if refined is not None:
    name, n, full = refined
    d, p = full.dense, full.pruned
    st.success(f"Full {name} ({n} examples): accuracy {p.accuracy:.1%} (dense {d.accuracy:.1%}, "
               f"{(p.accuracy - d.accuracy) * 100:+.1f} pts); latency batch 1 {p.latency_b1_ms:.1f} ms vs "
               f"{d.latency_b1_ms:.1f} ms, batch {big} {getattr(p, f'latency_b{big}_ms'):.0f} ms vs "
               f"{getattr(d, f'latency_b{big}_ms'):.0f} ms (more repeats, timed in a separate process).")
elif gates != ManualGates():  # nothing pruned: the dense model's full-dev figures are the Model page's
    job, path = f"gates-eval-{digest}-{data.fingerprint()}", g.refined_path(digest, data)
    ensure_job(job, ["pruning", "evaluate", "--model", spec, *data_spec.cli_args(), "--gates", str(state_file),
                     "--out", str(path), "--job", job])
    st.session_state["gates_refining"] = job
    wait_for(job, "Full dev set", path.exists)

if len(history) > 1:
    chart(history_chart(pd.DataFrame(history).drop(columns="gates")), "history")
    note("history")
    keep_table("This session's changes", pd.DataFrame(history).drop(columns="gates"))

# ----------------------------------------------------------------------------- export
st.header("Export")
before = st.session_state.pop("standard_from", None)
if before is not None:  # the last rerun rounded the gates: what that cost, both measured on the same subset
    st.info(f"Rounded to the nearest standard shape: accuracy {before[0]:.1%} -> {pruned.accuracy:.1%}, batch 1 "
            f"{before[1]:.1f} -> {pruned.latency_b1_ms:.1f} ms, parameters {before[2] / 1e6:.2f} -> "
            f"{pruned.parameters / 1e6:.2f} M (Undo goes back).")
if st.button("Make it standard", disabled=gates == ManualGates(), key="make_standard",
             help="Round the structure to the nearest one a plain transformers config can describe (every layer "
                  "the same heads and FFN width; a decoder may drop whole layers), so the export loads with "
                  "from_pretrained alone; the figures above then show what it costs"):
    current = gates.state(loaded)
    rounded = round_to_standard(loaded, current)
    if rounded == current:
        st.caption("The structure is standard already.")
    else:
        st.session_state["standard_from"] = (pruned.accuracy, pruned.latency_b1_ms, pruned.parameters)
        g.apply(ManualGates.from_state(rounded), "make it standard")
        st.rerun()
out = export_folder(f"{spec if spec in ('default', 'minilm-l3') else 'model'}-{digest[:6]}", "export_name")
if out is None:
    st.stop()
save_panel(out, digest, lambda: g.pruned_model(loaded, gates), f"Export the pruned model as {out.name} (folder + ONNX)",
           disabled=gates == ManualGates())
