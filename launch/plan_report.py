"""The planner's table: what `python -m launch.plan` prints from plan()'s dict (also its `--json`)."""
from __future__ import annotations

from launch.search_space import recompute_label, recompute_value


def _fmt_hours(hours: float) -> str:
    if hours < 1:
        return f"{hours * 60:.1f} min"
    if hours < 48:
        return f"{hours:.1f} h"
    return f"{hours / 24:.1f} days"


def format_table(r: dict) -> str:
    hw = "x".join(map(str, r["image_size"]))
    lines = [
        f"plan for {r['config']}",
        f"  model          {r['model']} at {hw} px, {r['num_classes']} classes, {r['precision']}",
        f"  parameters     {r['parameters'] / 1e6:,.1f} M (largest layer {r['largest_layer_parameters'] / 1e6:,.1f} M)",
        f"  multiply-adds  {r['macs_per_image'] / 1e9:,.1f} G per image (forward)",
        f"  activations    {r['activation_gib_per_image']:.3f} GiB/image, "
        f"{r['activation_gib_per_image_checkpointed']:.3f} GiB/image with activation checkpointing "
        f"(+{r['activation_gib_fixed']:.2f} GiB fixed)",
        f"  cluster        {r['nodes']} node(s) x {r['gpus_per_node']} GPU(s) = {r['gpus']} GPUs of "
        f"{r['gpu_mem_gib']:g} GiB ({r['usable_gib']:.1f} GiB usable after {r['reserve_gib']:g} GiB of CUDA context; "
        f"states include DeepSpeed's buckets, activations the larger of a step and an evaluation)",
        f"  global batch   {r['global_batch_size']}",
        "",
    ]
    if r["options"]:
        header = (f"  {'ZeRO setting':<32}{'recomp.':>8}{'micro':>7}{'accum':>7}{'states':>9}{'activ.':>9}"
                  f"{'total':>9}{'CPU/node':>10}{'comm GB':>9}{'compute':>9}{'exposed':>9}  fits")
        lines += [header, "  " + "-" * (len(header) - 2)]
        chosen = r["chosen"]
        for o in r["options"]:
            mark = "  <= chosen" if chosen == o else ""
            off = ("optimizer+param" if o["offload_param"] else "optimizer") if o["offload_optimizer"] else "none"
            micro = str(o["micro_batch_size"]) if o["fits"] else "-"
            accum = str(o["accumulation"]) if o["fits"] else "-"
            lines.append(f"  {'ZeRO-%d, offload %s' % (o['zero_stage'], off):<32}"
                         f"{recompute_label(o['activation_checkpointing'], short=True):>8}{micro:>7}{accum:>7}"
                         f"{o['states_gib']:>9.1f}{o['activations_gib']:>9.1f}{o['total_gib']:>9.1f}"
                         f"{o['cpu_per_node_gib']:>10.1f}{o['comm_gb']:>9.2f}{o['compute_s']:>8.2f}s"
                         f"{o['exposed_s']:>8.2f}s  {'yes' if o['fits'] else 'no'}{mark}")
        lines.append("  (GiB per GPU; a row that does not fit shows its need at micro-batch 1. Per step and GPU: GB "
                     f"sent, compute at MFU {r['mfu']:g}, communication not hidden by it at {r['net_gbps']:g} Gb/s)")
        if r.get("offload_note"):
            lines.append("  " + r["offload_note"])
        lines.append("")
    c = r["chosen"]
    if c:
        lines.append(f"PLAN: ZeRO-{c['zero_stage']}, offload "
                     f"{('optimizer+param' if c['offload_param'] else 'optimizer') if c['offload_optimizer'] else 'none'}"
                     f", activation checkpointing {recompute_label(c['activation_checkpointing'])}, micro-batch "
                     f"{c['micro_batch_size']} x accumulation {c['accumulation']} x {r['gpus']} GPUs = "
                     f"{r['global_batch_size']}; {c['total_gib']:.1f} of {r['usable_gib']:.1f} GiB per GPU")
        lines.append("  overrides: " + " ".join(r["overrides"]))
        if isinstance(c["activation_checkpointing"], list):
            lines.append(f"  recompute: model.activation_checkpointing={recompute_value(c['activation_checkpointing'])}"
                         f" runs {c['recompute']:.0%} of the forward again in backward (all stages: 100%)")
        if c["staging_gib"]:
            lines.append(f"  async checkpoint staging: {c['staging_gib']:.2f} GiB of host memory on rank 0 (pinned; the "
                         f"other ranks hold no module copy), counted in CPU/node for rank 0's node")
        lines.append(f"  why: {r['choice']}")
        lines.append(f"  communication per step: {c['comm']}; {c['comm_s']:.2f} s at {r['net_gbps']:g} Gb/s, "
                     f"{c['exposed_s']:.2f} s not overlapped, next to {c['compute_s']:.2f} s of compute")
    else:
        lines.append(f"NO PLAN: {r['reason']}")
    w = r["as_written"]
    accum = f"accumulation {w['accumulation']}" if w["accumulation"] else "does not divide the global batch"
    lines.append(f"  config as written: {w['setting']}, activation checkpointing "
                 f"{recompute_label(w['activation_checkpointing'])}, micro-batch {w['micro_batch_size']} ({accum}): "
                 f"{w['total_gib']:.1f} GiB per GPU -> {'fits' if w['fits'] else 'does NOT fit'}")
    lines += [
        "",
        f"time at MFU {r['mfu']:g} of {r['gpu_tflops']:g} TFLOP/s per GPU "
        f"({r['train_flops_per_image'] / 1e12:.3f} TFLOP per training image):",
        f"  epoch          {r['images_per_epoch']:,} images ({r['dataset_source']}): {_fmt_hours(r['epoch_hours'])}",
        f"  whole run      {r['total_steps']:,} steps of {r['global_batch_size']}: {_fmt_hours(r['total_hours'])}",
    ]
    if r.get("exposed_hours"):
        lines.append(f"  + communication not hidden by compute: {_fmt_hours(r['exposed_hours'])}; whole run "
                     f"{_fmt_hours(r['total_hours'] + r['exposed_hours'])}")
    if c and c["activation_checkpointing"]:
        lines.append(f"  (activation checkpointing recomputes {c['recompute']:.0%} of the forward: MFU {r['mfu']:g} is "
                     f"HFU {r['hfu']:.2f})")
    return "\n".join(lines)
