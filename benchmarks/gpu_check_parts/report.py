"""The summary table benchmarks/gpu_check.py prints last, from the figures it wrote to gpu_check.json."""
from __future__ import annotations


def summary(results: dict, s: dict) -> str:
    lines = ["", "=" * 100, "gpu_check summary", "-" * 100]
    speed = results.get("speed")
    if speed is None:
        pass  # not asked for (--only)
    elif isinstance(speed, dict) and "error" not in speed and "skipped" not in speed:
        lines.append(f"{'model':14s} {'ours img/s':>11s} {'timm img/s':>11s} {'ours/timm':>9s} {'TFLOP/s':>8s} "
                     f"{'MFU':>6s}   (batch {s['batch']}, {s['size']} px, bf16)")
        for name, _ in s["models"]:
            r = speed.get(name, {})
            if "ours_images_per_s" not in r:
                lines.append(f"{name:14s} {r}")
                continue
            mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "-"
            timm_ips = f"{r['timm_images_per_s']:.1f}" if "timm_images_per_s" in r else "-"
            ratio = f"{r['ratio_ours_timm']:.3f}" if "ratio_ours_timm" in r else "-"
            lines.append(f"{name:14s} {r['ours_images_per_s']:11.1f} {timm_ips:>11s} {ratio:>9s} "
                         f"{r['ours_tflops']:8.1f} {mfu:>6s}")
    else:
        lines.append(f"speed: {speed}")
    att = results.get("attention", {})
    for shape, r in (att.items() if isinstance(att, dict) and "error" not in att else []):
        if not isinstance(r, dict):
            continue
        times = ", ".join(f"{k} {v['ms']:.2f} ms" if isinstance(v, dict) else f"{k} {v}" for k, v in r["kernels"].items())
        lines.append(f"attention {shape}: fastest {r['fastest']} ({times})")
    if "error" in att:
        lines.append(f"attention: {att['error']}")
    for decode, ld in (results.get("decode") or {}).items():
        if decode == "seconds":
            continue
        if isinstance(ld, dict) and "images_per_s" in ld:
            need = f"{ld['model_images_per_s']:.1f}" if ld.get("model_images_per_s") else "?"
            lines.append(f"decode={decode}: {ld['images_per_s']:.1f} img/s with {ld['workers']} workers "
                         f"({ld['cpu_cores']} cores) vs {s['headline']} training {need} img/s: sustains={ld['sustains']}")
        else:
            lines.append(f"decode={decode}: {ld}")
    if "trainer" in results:
        lines += trainer_lines(results["trainer"])
    mem = results.get("memory", {})
    if "memory" not in results:
        pass
    elif "estimate_step_gib" in mem:
        reserved, allocated = mem.get("measured_peak_reserved_gib"), mem.get("measured_peak_allocated_gib")
        measured = "-" if reserved is None else f"{reserved:.2f} GiB reserved ({allocated:.2f} allocated)"
        lines.append(f"memory {mem['model']} micro {mem['micro_batch']}: measured {measured} vs launch.plan "
                     f"{mem['estimate_step_gib']:.2f} GiB [{mem['measured_with']}]")
    else:
        lines.append(f"memory: {mem}")
    comp = results.get("compile", {})
    if "compile" not in results:
        pass
    elif "speedup" in comp:
        lines.append(f"compile {comp['model']} ({comp['backend']}): eager {comp['eager_images_per_s']:.1f} img/s, "
                     f"compiled {comp['compiled_images_per_s']:.1f} img/s, x{comp['speedup']:.2f} "
                     f"({comp['seconds_incl_compile']:.0f} s incl. compile)")
    else:
        lines.append(f"compile: {comp}")
    lines.append(f"device: {results['device']}; total {results['seconds']:.0f} s of budget {results['budget_s']:.0f} s")
    lines.append("=" * 100)
    return "\n".join(lines)


def trainer_lines(tr: dict) -> list[str]:
    if "model" not in tr:
        return [f"trainer: {tr}"]
    lines = [f"trainer {tr['model']} {tr['size']} px, micro {tr['micro_batch']}, {tr['workers']} workers:"]
    for run in ("eager", "resume", "compiled"):
        r = tr.get(run, {})
        if "steps_per_s" not in r:
            lines.append(f"  {run:9s} {str(r)[:300]}")
            continue
        rate = f"{r['steps_per_s']:.2f}" if r["steps_per_s"] else "-"
        lines.append(f"  {run:9s} steps {r['first_step']}-{r['last_step']}: {rate} steps/s, host syncs/step "
                     f"{r['syncs_per_step_median']} (median; sync debug mode {r['sync_debug_mode']}), graph breaks "
                     f"{r['graph_breaks']}, recompiles {r['recompiles']}")
    lines.append(f"  resumed from the saved step: {tr.get('resumed_from_saved_step')}; SDPA per attention stage: "
                 f"{tr.get('sdpa_backends')}")
    return lines
