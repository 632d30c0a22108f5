"""The timm half of ``python -m bench.coverage --zoo timm`` (see that module's docstring).

Per model: traced (and by which front end), the prunable share of the weights, groups, blocks,
the masking oracle on random plans (a plan whose float32 error exceeds :data:`TOLERANCE` is
checked again in float64, which tells rounding amplified by a deep random network from a real
difference), and ``compile`` to 0.5 on :class:`bench._timm.MacsBackend`
(plan valid, planned shapes, equal to the oracle). The prunable share is given two ways:
``prunable`` is the library's report figure (share of conv / linear module weights), and
``prunable_all`` divides the same numerator by every weight of two or more dims in the model
(functional weights, embeddings and positional tables included), so a model whose convs are
not modules cannot look covered.
"""

from __future__ import annotations

import gc
import inspect
import multiprocessing as mp
import time
import traceback
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

import fxprune
from bench._common import (
    commit,
    exact_part,
    inexact_pruned,
    make_sensitive,
    progress_bar,
    rel_err,
    write_results,
)
from bench._timm import MacsBackend, create, family_of, input_shape, kind_of, select_models
from fxprune.analysis.plans import random_plan
from fxprune.pipeline.report import prunable_fraction
from fxprune.rewrite.shapes import check_planned_shapes

__all__ = ["run_isolated", "run_model", "run_zoo"]

TOLERANCE = 1e-4  # relative error pruned vs oracle in float32
#: the attention mode whose results take the plain file name: fxprune's default
#: (``DEFAULT_ATTENTION``, spelt out so the bench still runs on commits from before it)
DEFAULT = "auto"
TOLERANCE_F64 = 1e-9  # the same in float64, where float32 rounding is amplified past TOLERANCE


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def _stopping_reasons(a: Any) -> list[tuple[str, int]]:
    """Why groups froze, by how many conv/linear weights they hold back (largest first)."""
    weight: Counter[str] = Counter()
    spaces = a.spaces
    seen: set[tuple[str, str]] = set()
    for rec in spaces.layers:
        if rec.kind == "norm":
            continue
        numel = a.gm.get_submodule(rec.target).weight.numel()
        for gid in spaces.groups_of(rec.in_units) + spaces.groups_of(rec.out_units):
            g = spaces.groups[gid]
            for reason in g.frozen:
                if (rec.target, reason) not in seen:
                    seen.add((rec.target, reason))
                    weight[reason] += numel
    return weight.most_common(5)


#: what this fxprune's ``analyze`` takes (the bench also runs on older commits: before
#: ``attention=`` every split analysed as head_dim, before ``frontend=`` fx only)
_ANALYZE_TAKES = frozenset(inspect.signature(fxprune.analyze).parameters)


def _analyze(model: torch.nn.Module, x: torch.Tensor, attention: str = DEFAULT) -> Any:
    options = {"attention": attention} if "attention" in _ANALYZE_TAKES else {}
    if "frontend" in _ANALYZE_TAKES:
        return fxprune.analyze(model, x, frontend="auto", **options)
    return fxprune.analyze(model, x, **options)


def _oracle(a: Any, plan: Any, pruned: torch.nn.Module, x: torch.Tensor) -> float:
    check_planned_shapes(a, plan, pruned)  # the oracle cannot see a wrong shape
    with torch.no_grad():
        return rel_err(pruned(x), fxprune.masked_forward(a, plan, x))


def _oracle_f64(
    model: torch.nn.Module, x: torch.Tensor, plans: list[Any], attention: str = DEFAULT
) -> float:
    """The largest oracle error of ``plans`` on a float64 copy of ``model``."""
    import copy

    m64, x64 = copy.deepcopy(model).double(), x.double()
    a64 = _analyze(m64, x64, attention)
    return max(_oracle(a64, plan, fxprune.prune(a64, plan), x64) for plan in plans)


def run_model(name: str, family: str, n_plans: int, attention: str = DEFAULT) -> dict:
    """Every check of one timm model; errors are recorded in the row, never raised.
    ``attention``: what multi-head splits offer (:func:`fxprune.analyze`)."""
    row: dict = {"model": name, "family": family, "kind": kind_of(family)}
    t0 = time.perf_counter()
    torch.manual_seed(0)
    shape = input_shape(name)
    row["input"] = list(shape)
    try:
        x = torch.randn(*shape)
        model = make_sensitive(create(name, shape), x).eval()
    except Exception as exc:
        row.update(built=False, traced=False, error=_first_line(exc))
        return row
    row["params_M"] = sum(p.numel() for p in model.parameters()) / 1e6
    all_weights = sum(p.numel() for p in model.parameters() if p.ndim >= 2)
    try:
        t = time.perf_counter()
        a = _analyze(model, x, attention)
        row["analyze_s"] = time.perf_counter() - t
        row.update(traced=True, frontend=getattr(a, "frontend", "fx"))
    except Exception as exc:
        row.update(traced=False, error=_first_line(exc))
        return row
    frac = prunable_fraction(a)
    seen = sum(
        p.numel()
        for m in a.gm.modules()
        if isinstance(m, (torch.nn.modules.conv._ConvNd, torch.nn.Linear))
        for p in m.parameters(recurse=False)
        if p.ndim >= 2
    )
    row.update(
        prunable=frac["prunable"],
        exact=frac["exact"],
        prunable_all=frac["prunable"] * seen / all_weights if all_weights else 0.0,
        groups=len(a.groups),
        prunable_groups=sum(g.prunable for g in a.groups),
        blocks=len(a.blocks),
        stops=_stopping_reasons(a),
    )
    errs = []
    try:
        plans = [random_plan(a, seed) for seed in range(n_plans)]
        for plan in plans:
            errs.append(_oracle(a, plan, fxprune.prune(a, plan), x))
        row["oracle_max_rel_err"] = max(errs) if errs else 0.0
        row["oracle_equal"] = all(e <= TOLERANCE for e in errs)
        if not row["oracle_equal"]:
            row["oracle_f64_rel_err"] = _oracle_f64(model, x, plans, attention)
            row["oracle_equal"] = row["oracle_f64_rel_err"] <= TOLERANCE_F64
    except Exception as exc:
        row.update(oracle_equal=False, oracle_error=_first_line(exc))
        traceback.print_exc()
    try:
        t = time.perf_counter()
        config = (
            fxprune.CompileConfig(attention=attention) if "attention" in _ANALYZE_TAKES else None
        )
        res = fxprune.compile(model, 0.5, example_inputs=x, backend=MacsBackend(), config=config)
        row["compile_s"] = time.perf_counter() - t
        res.plan.validate(res.analysis)
        err = _oracle(res.analysis, res.plan, res.model, x)
        if err > TOLERANCE:
            row["compile_oracle_f64_rel_err"] = _oracle_f64(model, x, [res.plan], attention)
        equal = err <= TOLERANCE or row.get("compile_oracle_f64_rel_err", 1.0) <= TOLERANCE_F64
        inexact = inexact_pruned(res.analysis, res.plan)
        if not equal and inexact:
            # compile prunes inexact groups (their norms see fewer channels): masking cannot be
            # equal there by design, so the rest of the plan is checked with those kept whole
            rest = exact_part(res.analysis, res.plan)
            row["compile_oracle_exact_part_rel_err"] = _oracle(
                res.analysis, rest, fxprune.prune(res.analysis, rest), x
            )
            equal = row["compile_oracle_exact_part_rel_err"] <= TOLERANCE
        row.update(
            compile_ok=True,
            compile_budget_met=bool(res.budget_met),
            compile_ratio=res.measured_ms / res.dense_ms if res.dense_ms else None,
            compile_oracle_rel_err=err,
            compile_inexact_groups=len(inexact),
            compile_oracle_equal=equal,
        )
    except Exception as exc:
        row.update(compile_ok=False, compile_error=_first_line(exc))
    row["total_s"] = time.perf_counter() - t0
    return row


def _child(
    name: str, family: str, n_plans: int, threads: int | None, queue: Any, attention: str
) -> None:
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        queue.put(run_model(name, family, n_plans, attention))
    except BaseException as exc:  # keep the parent informed whatever happens
        queue.put({"model": name, "family": family, "traced": False, "error": _first_line(exc)})


def _failed_row(name: str, family: str, proc: Any, timeout: float) -> dict:
    timed_out = proc.exitcode is None or proc.exitcode < 0
    why = (
        f"timed out after {timeout:.0f} s"
        if timed_out
        else f"child exited with code {proc.exitcode}"
    )
    return {"model": name, "family": family, "kind": kind_of(family), "traced": False,
            "error": why}  # fmt: skip


def run_isolated(
    pairs: list[tuple[str, str]],
    n_plans: int,
    timeout: float,
    jobs: int = 1,
    attention: str = DEFAULT,
) -> Iterator[tuple[int, dict]]:
    """``run_model`` per ``(name, family)`` in forked children, ``jobs`` at a time.

    A hang, a crash or running out of memory becomes a row, not a dead run. Yields
    ``(index into pairs, row)`` as models finish (in finishing order when ``jobs > 1``). With
    several jobs each child gets an equal share of the CPU threads, so children do not
    oversubscribe the cores (the MAC-count runtime does not time anything, so the figures do
    not depend on it).
    """
    ctx = mp.get_context("fork")
    threads = None if jobs == 1 else max(1, torch.get_num_threads() // jobs)
    todo = list(enumerate(pairs))
    running: dict[int, tuple[Any, Any, float]] = {}
    while todo or running:
        while todo and len(running) < jobs:
            i, (name, family) = todo.pop(0)
            queue = ctx.Queue()
            proc = ctx.Process(
                target=_child, args=(name, family, n_plans, threads, queue, attention)
            )
            proc.start()
            running[i] = (proc, queue, time.monotonic() + timeout)
        time.sleep(0.2)
        for i, (proc, queue, deadline) in list(running.items()):
            name, family = pairs[i]
            try:  # a child that has exited has flushed its row into the pipe
                row = queue.get(timeout=1.0 if not proc.is_alive() else 0.01)
            except Exception:  # queue.Empty: still working, timed out, or died without a word
                if proc.is_alive() and time.monotonic() < deadline:
                    continue
                row = None
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join()
            del running[i]
            yield i, row if row is not None else _failed_row(name, family, proc, timeout)


def _pct(n: int, d: int) -> str:
    return f"{n}/{d} ({n / d:.0%})" if d else "0/0"


def summary(rows: list[dict]) -> dict[str, Any]:
    """The figures issue 17 asks for, over ``rows``."""
    n = len(rows)
    ok = [r for r in rows if r.get("traced") and r.get("oracle_equal")]
    cnn = [r for r in rows if r.get("kind") == "cnn"]
    cnn_frac = sorted(r.get("prunable", 0.0) if r.get("traced") else 0.0 for r in cnn)
    comp = [r for r in rows if r.get("compile_ok") and r.get("compile_oracle_equal")]
    return {
        "models": n,
        "analysed_and_oracle_exact": len(ok),
        "cnn_models": len(cnn),
        "cnn_prunable_ge_0.9": sum(f >= 0.9 for f in cnn_frac),
        "cnn_median_prunable": cnn_frac[len(cnn_frac) // 2] if cnn_frac else None,
        "cnn_mean_prunable": sum(cnn_frac) / len(cnn_frac) if cnn_frac else None,
        "compile_valid_and_exact": len(comp),
        "compile_budget_met": sum(bool(r.get("compile_budget_met")) for r in comp),
        "frontends": dict(Counter(r.get("frontend") for r in rows if r.get("traced"))),
    }


def to_markdown(rows: list[dict], env: dict) -> str:
    s = summary(rows)
    lines = [
        f"# Coverage over timm ({env['timm']}, torch {env['torch']}, commit {env['commit']}, "
        f"attention={env.get('attention', 'head_dim')})",
        "",
        f"- analysed and oracle-exact: {_pct(s['analysed_and_oracle_exact'], s['models'])}",
        f"- CNN models with ≥ 90 % prunable weights: {_pct(s['cnn_prunable_ge_0.9'], s['cnn_models'])}"
        f" (median {s['cnn_median_prunable'] or 0:.1%}, mean {s['cnn_mean_prunable'] or 0:.1%})",
        f"- compile to 0.5 (MAC-count runtime) valid and oracle-exact: "
        f"{_pct(s['compile_valid_and_exact'], s['models'])}; budget met in {s['compile_budget_met']}",
        f"- front ends: {s['frontends']}",
        "",
        "| model | family | kind | input | traced | prunable | of all weights | exact | groups (prunable) | blocks | oracle | compile 0.5 | total (s) |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|---|---|---:|",
    ]
    for r in rows:
        size = "×".join(str(v) for v in r.get("input", [])[-2:])
        if not r.get("traced"):
            lines.append(
                f"| {r['model']} | {r['family']} | {r.get('kind', '')} | {size} | "
                f"no: {r.get('error', '')[:90]} ||||||||"
            )
            continue
        comp = (
            ("ok" if r.get("compile_oracle_equal") else "NOT EXACT")
            + (
                f" ({r['compile_inexact_groups']} inexact)"
                if r.get("compile_inexact_groups")
                else ""
            )
            + f" {r.get('compile_ratio') or 0:.2f}×"
            if r.get("compile_ok")
            else "fails: " + r.get("compile_error", "")[:60]
        )
        oracle = "yes" if r.get("oracle_equal") else "NO " + r.get("oracle_error", "")[:60]
        lines.append(
            f"| {r['model']} | {r['family']} | {r['kind']} | {size} | {r.get('frontend', 'fx')} | "
            f"{r['prunable']:.1%} | {r['prunable_all']:.1%} | {r['exact']:.1%} | "
            f"{r['groups']} ({r['prunable_groups']}) | {r['blocks']} | {oracle} | {comp} | "
            f"{r.get('total_s', float('nan')):.1f} |"
        )
    short = [
        r
        for r in rows
        if not r.get("traced")
        or not r.get("oracle_equal")
        or not r.get("compile_oracle_equal")
        or (r.get("kind") == "cnn" and r.get("prunable", 0) < 0.9)
    ]
    lines += ["", "## What stops the rest", "", "| model | kind | what stops it |", "|---|---|---|"]
    for r in short:
        if not r.get("traced"):
            why = r.get("error", "")
        elif not r.get("oracle_equal"):
            why = "oracle: " + r.get("oracle_error", f"rel err {r.get('oracle_max_rel_err')}")
        elif not r.get("compile_ok"):
            why = "compile: " + r.get("compile_error", "")
        elif not r.get("compile_oracle_equal"):
            why = f"compile's plan differs from the oracle ({r.get('compile_oracle_rel_err'):.1e})"
        else:
            why = f"{r['prunable']:.0%} prunable; " + "; ".join(
                f"{reason} ({w / 1e6:.2f} M weights)" for reason, w in r.get("stops", [])[:2]
            )
        lines.append(f"| {r['model']} | {r.get('kind', '')} | {why[:220].replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def run_zoo(
    names: list[str] | None,
    n_plans: int,
    timeout: float,
    out: Path,
    jobs: int = 1,
    attention: str = DEFAULT,
) -> int:
    """Run the timm coverage over ``names`` (default: :func:`bench._timm.select_models`)."""
    import timm

    pairs = [(n, family_of(n)) for n in names] if names else select_models()
    env = {
        "torch": torch.__version__,
        "timm": timm.__version__,
        "commit": commit(),
        "plans_per_model": n_plans,
        "timeout_s": timeout,
        "jobs": jobs,
        "attention": attention,
        "selection": [n for n, _ in pairs],
    }
    done: dict[int, dict] = {}
    console = Console(stderr=True)
    name = "coverage_timm" if not names else "coverage_timm_subset"
    if attention != DEFAULT:  # beside the default's results, not over them
        name += f"_{attention}"
    with progress_bar(console) as progress:
        task = progress.add_task("timm", total=len(pairs))
        for i, row in run_isolated(pairs, n_plans, timeout, jobs, attention):
            done[i] = row
            gc.collect()
            progress.update(task, description=f"timm: {row['model']}", advance=1)
            rows = [done[k] for k in sorted(done)]  # selection order, whatever finished first
            data = {"env": env, "summary": summary(rows), "rows": rows}
            write_results(out / f"{name}.json", data, to_markdown(rows, env))
    console.print(to_markdown(rows, env))
    return 0
