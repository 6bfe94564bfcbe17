"""The run report: one self-contained HTML page built from a run folder alone.

    write_report("runs/grpo_vqa")        # -> runs/grpo_vqa/report.html  (also `vlm-rl report RUN_DIR`)

It reads run_config.json, metrics.jsonl and what the held-out evaluations kept
(`vlm_rl.report.records`) and writes: a summary (base model, algorithm, data, reward components
with their weights, key settings, wall time, held-out first -> last evaluation), a curve for every
logged metric (grouped: reward, components, held-out metrics, KL, entropy, clip fraction, explained
variance, learning rate, time per stage, then the rest), the gallery of held-out images with their
completions and rewards at the first and last evaluation, agent film strips (each frame with its
action and reward) and, for reward models, histograms of chosen vs rejected held-out scores.

Plots are inline SVG (`vlm_rl.report.svg`), images base64 PNG: the page loads nothing.
"""

from __future__ import annotations

import base64
import datetime
import math
import os
from collections.abc import Callable
from html import escape
from pathlib import Path
from typing import Any

from vlm_rl.report.svg import histogram, line_chart, number
from vlm_rl.run_folder import RunFolder, _read_jsonl

RL_SETTINGS = (
    "prompts_per_step",
    "samples_per_prompt",
    "max_new_tokens",
    "temperature",
    "learning_rate",
    "lr_scheduler_type",
    "total_steps",
    "ppo_epochs",
    "minibatch_size",
    "clip_range",
    "entropy_coef",
    "kl_coef",
    "missing_eos_penalty",
    "lora_r",
    "seed",
)
REWARD_MODEL_SETTINGS = (
    "learning_rate",
    "lr_scheduler_type",
    "per_device_batch_size",
    "gradient_accumulation_steps",
    "max_steps",
    "num_epochs",
    "center_rewards_coefficient",
    "lora_r",
    "seed",
)

Matcher = Callable[[str], bool]


def _keys(*names: str) -> Matcher:
    return lambda key: key in names


def _prefix(prefix: str, suffix: str = "", exclude: tuple[str, ...] = ()) -> Matcher:
    return lambda key: key.startswith(prefix) and key.endswith(suffix) and key not in exclude


# (title, which keys, a std band for the mean): the curves in the order shown; the keys no group
# takes get a chart each under "Other metrics".
RL_CHARTS: list[tuple[str, Matcher]] = [
    ("Reward (mean ± std)", _keys("reward/mean", "reward/total/mean")),
    ("Reward components (mean)", _prefix("reward/", "/mean", exclude=("reward/total/mean",))),
    ("KL to the reference", _keys("objective/kl", "policy/approx_kl", "loss/kl", "objective/kl_coef")),
    ("Entropy", _keys("policy/entropy")),
    ("Clip fraction", _keys("policy/clip_fraction", "loss/value_clip_fraction")),
    ("Value explained variance", _keys("objective/explained_variance")),
    ("Losses", _prefix("loss/", exclude=("loss/kl", "loss/value_clip_fraction", "loss/grad_norm"))),
    ("Learning rate", _keys("train/lr")),
    ("Time per stage (s)", _prefix("time/", "_s")),
    ("Share of the step", _prefix("time/", "_share")),
    ("Throughput (tokens/s)", _keys("perf/tokens_per_s", "perf/throughput", "throughput/tokens_per_s")),
    ("Rollout engine", _keys("rollout/is_ratio_mean", "rollout/is_ratio_max", "rollout/policy_lag")),
    ("Training episodes", _prefix("episodes/")),
    ("Completions", _prefix("completions/")),
]
REWARD_MODEL_CHARTS: list[tuple[str, Matcher]] = [
    ("Pairwise accuracy", _keys("train/accuracy", "eval/accuracy")),
    ("Margin (chosen - rejected)", _keys("train/margin", "eval/margin")),
    ("Loss", _keys("train/loss")),
    ("Learning rate", _keys("train/lr")),
]

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#222;background:#fff}
h1{font-size:22px;margin:0 0 4px} h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
h3{font-size:15px;margin:16px 0 6px} .muted{color:#777;font-size:13px}
table{border-collapse:collapse;font-size:13px} td,th{border:1px solid #ddd;padding:4px 8px;vertical-align:top;text-align:left}
th{background:#f5f5f5} .summary th{width:190px} .num{font-variant-numeric:tabular-nums;text-align:right}
.charts{display:flex;flex-wrap:wrap;gap:10px}
svg.chart{border:1px solid #eee;background:#fcfcfc}
svg .grid{stroke:#e6e6e6;stroke-width:1} svg .frame{fill:none;stroke:#bbb}
svg .tick{font-size:10px;fill:#666} svg .axis{font-size:11px;fill:#444} svg .title{font-size:13px;font-weight:600;fill:#222}
svg .legend{font-size:10.5px;paint-order:stroke;stroke:#fcfcfc;stroke-width:3px;stroke-linejoin:round}
.cards{display:flex;flex-wrap:wrap;gap:10px} .card{border:1px solid #ddd;padding:6px;width:285px;font-size:13px}
.card-head{display:flex;gap:8px;margin-bottom:4px} .card table{width:100%} .card th{width:52px;font-weight:500}
img.sample{width:64px;height:64px;image-rendering:pixelated;border:1px solid #ccc}
.strip{display:flex;gap:4px;flex-wrap:wrap;margin:4px 0 12px}
.frame{display:flex;flex-direction:column;align-items:center;font-size:11px}
.frame img{width:72px;height:72px;image-rendering:pixelated;border:1px solid #ccc}
.good{color:#11772d} .bad{color:#b3261e} code{font-size:12px}
"""

# Marks, once the page has loaded, how many of its images decoded: a test reads it from the DOM.
SCRIPT = """
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  document.body.dataset.images = images.length;
  document.body.dataset.imagesDecoded = images.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
});
"""


def write_report(run_dir: str | Path) -> Path:
    """Write `run_dir/report.html` (atomically: a reader never sees half a page); returns its path.
    Raises FileNotFoundError when `run_dir` is not a vlm_rl run folder."""
    run = RunFolder(run_dir)
    page = build_report(run)
    tmp = run.report_file.with_name(f".{run.report_file.name}.tmp{os.getpid()}")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(run.report_file)
    return run.report_file


def build_report(run: RunFolder) -> str:
    """The report page of `run` as one HTML string."""
    if not run.config_file.is_file() and run.find_metrics_file() is None:
        raise FileNotFoundError(
            f"{run.root} is not a vlm_rl run folder (no run_config.json, no metrics.jsonl): pass the "
            "output_dir of a training run"
        )
    config = run.read_config() if run.config_file.is_file() else {}
    records = run.read_metrics()
    kind = run_kind(run, config, records)
    held_out, training, other = _curves(records, kind, run.evaluation_label())
    examples = {"rl": _gallery, "agent": _film_strips, "reward_model": _score_histograms}[kind](run)
    sections = [
        _summary(run, config, records, kind),
        held_out,
        examples,
        training,
        other,
        _final_values(records),
    ]
    title = f"vlm_rl run report: {run.root.resolve().name}"
    generated = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{escape(title)}</title><style>{STYLE}</style><script>{SCRIPT}</script></head>\n"
        f'<body data-kind="{kind}"><h1>{escape(title)}</h1>'
        f'<div class="muted">{escape(str(run.root))} · written {generated} by vlm-rl report</div>\n'
        + "\n".join(section for section in sections if section)
        + "\n</body></html>\n"
    )


def run_kind(run: RunFolder, config: dict[str, Any], records: list[dict[str, Any]]) -> str:
    """ "rl", "agent" or "reward_model", by the run's config and what it logged."""
    if "algorithm" not in config and any(
        k in config for k in ("per_device_batch_size", "center_rewards_coefficient")
    ):
        return "reward_model"
    if run.eval_episodes_file.is_file() or any(k.startswith("episodes/") for r in records for k in r):
        return "agent"
    if "algorithm" in config:
        return "rl"
    return "reward_model" if run.eval_scores_file.is_file() else "rl"


# -- summary ------------------------------------------------------------------------------------
def evaluations(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The metric records of held-out evaluations (those with eval/ keys), in order."""
    return [r for r in records if any(k.startswith("eval/") for k in r)]


def _data(run: RunFolder, config: dict[str, Any], kind: str) -> str:
    """The data row: the dataset (or environment) and what the run recorded its evaluations score;
    runs from before that record get the recipe's default (a test split, unseen seeds)."""
    source = "episodes of a visual environment" if kind == "agent" else str(config.get("dataset", "-"))
    evaluation = run.read_evaluation()
    if evaluation is not None:
        return escape(f"{source} (evaluation: {evaluation['description']})")
    if kind == "agent":
        return escape(f"{source} (held out: unseen seeds)")
    held_out = config.get("eval_dataset") or "its test split"
    return escape(f"{source} (held out: {held_out})")


def _evaluated_on(run: RunFolder, held_out_words: str) -> str:
    """`held_out_words` (e.g. "held-out prompts"), or the training data's words when the run
    recorded that its evaluations run on training data."""
    if run.evaluation_label() == "Held-out":
        return held_out_words
    return held_out_words.replace("held-out", "training") + " (no held-out split)"


def _summary(run: RunFolder, config: dict[str, Any], records: list[dict[str, Any]], kind: str) -> str:
    rows: list[tuple[str, str]] = [("Base model", escape(str(config.get("model_name_or_path", "-"))))]
    if kind == "reward_model":
        rows.append(("Algorithm", "reward model, Bradley-Terry loss on preference pairs"))
        settings = REWARD_MODEL_SETTINGS
    else:
        rows.append(("Algorithm", escape(str(config.get("algorithm", "-")).upper())))
        settings = RL_SETTINGS
    rows.append(("Data", _data(run, config, kind)))
    if kind != "reward_model":
        rows.append(("Reward components", _reward_components(config)))
    shown = ", ".join(
        f"{key} {escape(number(config[key]))}" for key in settings if config.get(key) is not None
    )
    rows.append(("Key settings", shown or "-"))
    last_step = records[-1]["step"] if records else None
    total = config.get("total_steps") or config.get("max_steps")
    rows.append(("Steps", f"{number(last_step)} of {number(total)}" if total else number(last_step)))
    rows.append(("Wall time", _wall_time(run)))
    evaluation = run.read_evaluation()
    line = _held_out_line(records)
    if evaluation is not None:
        line = f"{escape(evaluation['description'])}<br>{line}"
    rows.append((run.evaluation_label(), line))
    body = "".join(f"<tr><th>{name}</th><td>{value}</td></tr>" for name, value in rows)
    return f'<h2 id="summary">Summary</h2><table class="summary">{body}</table>'


def _reward_components(config: dict[str, Any]) -> str:
    funcs = config.get("reward_funcs") or []
    weights = config.get("reward_weights") or [1.0] * len(funcs)
    parts = [
        f"<code>{escape(str(name))}</code> × {number(float(w))}"
        for name, w in zip(funcs, weights, strict=False)
    ]
    if config.get("reward_model_path"):
        parts.append(
            f"<code>reward_model</code> ({escape(str(config['reward_model_path']))}) × "
            f"{number(float(config.get('reward_model_weight', 1.0)))}"
        )
    if config.get("normalize_rewards"):
        parts.append("each standardised over the batch")
    if config.get("missing_eos_penalty"):
        parts.append(f"minus {number(float(config['missing_eos_penalty']))} without EOS")
    return ", ".join(parts) or "-"


def _wall_time(run: RunFolder) -> str:
    """From run_config.json (written when training starts or resumes) to the last metrics record."""
    metrics = run.find_metrics_file()
    if metrics is None or not run.config_file.is_file():
        return "-"
    seconds = max(metrics.stat().st_mtime - run.config_file.stat().st_mtime, 0.0)
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    shown = (
        f"{hours} h {minutes:02d} min"
        if hours
        else f"{minutes} min {secs:02d} s"
        if minutes
        else f"{seconds:.1f} s"
    )
    return (
        f'<span id="wall-time" data-seconds="{seconds:.1f}">{shown}</span> (since the run started or resumed)'
    )


def _held_out_line(records: list[dict[str, Any]]) -> str:
    evals = evaluations(records)
    if not evals:
        return "no held-out evaluation logged yet"
    first, last = evals[0], evals[-1]
    keys = sorted({k for r in (first, last) for k in r if k.startswith("eval/")})
    items = []
    for key in keys:
        before, after = first.get(key), last.get(key)
        trend = ""
        if isinstance(before, (int, float)) and isinstance(after, (int, float)) and after != before:
            trend = ' class="good"' if after > before else ' class="bad"'
        items.append(
            f'<span class="held-out" data-key="{escape(key)}" data-before="{before!r}" data-after="{after!r}">'
            f"{escape(key.removeprefix('eval/'))} <b>{number(before)}</b> → <b{trend}>{number(after)}</b></span>"
        )
    return f"step {first['step']} → step {last['step']}: " + ", ".join(items)


# -- curves -------------------------------------------------------------------------------------
def _series(records: list[dict[str, Any]], key: str) -> list[tuple[float, float]]:
    return [
        (float(r["step"]), float(r[key]))
        for r in records
        if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)
    ]


def _curves(records: list[dict[str, Any]], kind: str, label: str = "Held-out") -> tuple[str, str, str]:
    """The sections of curves: held-out metrics, training (grouped), other metrics."""
    numeric = []
    for record in records:
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and key not in numeric:
                numeric.append(key)
    if not numeric:
        return '<h2 id="curves">Curves</h2><p class="muted">No metrics logged yet.</p>', "", ""
    groups = REWARD_MODEL_CHARTS if kind == "reward_model" else RL_CHARTS
    taken: set[str] = set()
    charts: list[str] = []
    for title, matches in groups:
        keys = [k for k in numeric if matches(k) and k not in taken]
        if not keys:
            continue
        taken.update(keys)
        bands = {}
        if "reward/mean" in keys and "reward/std" in numeric:
            taken.add("reward/std")
            std = dict(_series(records, "reward/std"))
            mean = _series(records, "reward/mean")
            bands["reward/mean"] = (
                [(x, y - std.get(x, 0.0)) for x, y in mean],
                [(x, y + std.get(x, 0.0)) for x, y in mean],
            )
        charts.append(line_chart(title, {k: _series(records, k) for k in keys}, bands=bands))
    held_out = [k for k in numeric if k.startswith("eval/") and k not in taken]
    held_out_charts = [
        line_chart(f"{label} {k.removeprefix('eval/')}", {k: _series(records, k)}) for k in held_out
    ]
    taken.update(held_out)
    others = [line_chart(k, {k: _series(records, k)}) for k in numeric if k not in taken]

    def block(name: str, items: list[str], anchor: str) -> str:
        items = [item for item in items if item]
        return f'<h2 id="{anchor}">{name}</h2><div class="charts">{"".join(items)}</div>' if items else ""

    return (
        block(f"{label} evaluation" if label == "Held-out" else label, held_out_charts, "curves-held-out"),
        block("Training curves", charts, "curves-training"),
        block("Other metrics", others, "curves-other"),
    )


# -- images -------------------------------------------------------------------------------------
def _image(path: Path, css: str, alt: str) -> str:
    if not path.is_file():
        return f'<span class="muted">({escape(path.name)} missing)</span>'
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img class="{css}" alt="{escape(alt)}" src="data:image/png;base64,{data}">'


def _first_and_last(records: list[dict[str, Any]]) -> tuple[int, int] | None:
    steps = sorted({r["step"] for r in records})
    return (steps[0], steps[-1]) if steps else None


def _reward_cell(step: int, record: dict[str, Any] | None) -> str:
    """One evaluation's completion of a gallery item: the text, its reward and components."""
    if record is None:
        return f'<tr><th>step {step}</th><td class="muted">-</td></tr>'
    components = ", ".join(f"{escape(k)} {number(v)}" for k, v in record.get("components", {}).items())
    return (
        f'<tr><th>step {step}</th><td><span class="completion">{escape(record["completion"]) or "<i>(empty)</i>"}'
        f'</span> · reward <b class="reward" data-value="{record["reward"]!r}">{number(record["reward"])}</b>'
        f'<div class="muted">{components}</div></td></tr>'
    )


def _kept(path: Path) -> tuple[list[dict[str, Any]], tuple[int, int] | None]:
    """The records of an evaluation file (`vlm_rl.report.records`) and their first and last step."""
    records = _read_jsonl(path) if path.is_file() else []
    return records, _first_and_last(records)


NOTHING_KEPT = '<p class="muted">No held-out evaluation kept yet.</p>'


def _gallery(run: RunFolder) -> str:
    records, steps = _kept(run.eval_samples_file)
    if steps is None:
        return f'<h2 id="gallery">{run.evaluation_label()} gallery</h2>{NOTHING_KEPT}'
    first, last = steps
    by_step = {step: {r["index"]: r for r in records if r["step"] == step} for step in steps}
    cards = []
    for index, record in by_step[first].items():
        images = "".join(
            _image(run.eval_images_dir / name, "sample", f"evaluation item {index}")
            for name in record["images"]
        )
        columns = ", ".join(f"{escape(k)}: {escape(str(v))}" for k, v in record.get("columns", {}).items())
        evaluations = _reward_cell(first, record)
        if last != first:
            evaluations += _reward_cell(last, by_step[last].get(index))
        cards.append(
            f'<div class="card gallery-item" data-index="{index}"><div class="card-head">{images}'
            f'<div>{escape(record["prompt"])}<div class="muted">{columns}</div></div></div>'
            f"<table>{evaluations}</table></div>"
        )
    return (
        f'<h2 id="gallery">{run.evaluation_label()} gallery</h2>'
        f'<p class="muted">Greedy completions on the first {_evaluated_on(run, "held-out prompts")} at the '
        f"first (step {first}) and last (step {last}) evaluation, with their reward and its components.</p>"
        f'<div class="cards">{"".join(cards)}</div>'
    )


def _film_strips(run: RunFolder) -> str:
    records, steps = _kept(run.eval_episodes_file)
    if steps is None:
        return f'<h2 id="episodes">{run.evaluation_label()} episodes</h2>{NOTHING_KEPT}'
    parts = [
        f'<h2 id="episodes">{run.evaluation_label()} episodes</h2>',
        f'<p class="muted">Greedy episodes on {_evaluated_on(run, "held-out seeds")}: each frame with the '
        "action taken on it and the reward it earned.</p>",
    ]
    numbers = sorted({r["episode"] for r in records if r["step"] == steps[0]})
    for number_ in numbers:
        for label, step in (("before", steps[0]), ("after", steps[1])):
            if label == "after" and steps[1] == steps[0]:
                continue
            episode = next((r for r in records if r["step"] == step and r["episode"] == number_), None)
            if episode is None:
                continue
            outcome = '<b class="good">success</b>' if episode["success"] else '<b class="bad">no success</b>'
            parts.append(
                f"<h3>seed {episode['seed']}, {label} (step {step}): {outcome}, return "
                f'{number(float(episode["return"]))}, {episode["turns"]} turns</h3><div class="strip film-strip" '
                f'data-step="{step}" data-seed="{episode["seed"]}">'
            )
            for turn, name in enumerate(episode["frames"]):
                if turn < len(episode["actions"]):
                    invalid = " (invalid)" if episode["invalid"][turn] else ""
                    caption = f"{escape(episode['actions'][turn])}{invalid}<br>r {number(float(episode['rewards'][turn]))}"
                else:
                    caption = "end"
                image = _image(run.eval_episodes_dir / name, "", f"seed {episode['seed']} turn {turn}")
                parts.append(f'<div class="frame">{image}<span>{caption}</span></div>')
            parts.append("</div>")
    return "".join(parts)


def _score_histograms(run: RunFolder) -> str:
    records, steps = _kept(run.eval_scores_file)
    if steps is None:
        return f'<h2 id="scores">{run.evaluation_label()} scores</h2>{NOTHING_KEPT}'
    charts = []
    for step in dict.fromkeys(steps):
        record = next(r for r in records if r["step"] == step)
        charts.append(
            histogram(
                f"{run.evaluation_label()} scores at step {step}",
                {"chosen": record["chosen"], "rejected": record["rejected"]},
            )
        )
    return (
        f'<h2 id="scores">{run.evaluation_label()} scores: chosen vs rejected</h2>'
        f'<div class="charts">{"".join(charts)}</div>'
    )


# -- every metric's last value ------------------------------------------------------------------
def _final_values(records: list[dict[str, Any]]) -> str:
    last: dict[str, tuple[int, Any]] = {}
    for record in records:
        for key, value in record.items():
            if key != "step":
                last[key] = (record["step"], value)
    if not last:
        return ""
    rows = "".join(
        f'<tr><td class="key">{escape(key)}</td><td class="num">{step}</td>'
        f'<td class="num value" data-value="{_repr(value)}">{escape(_shown(value))}</td></tr>'
        for key, (step, value) in sorted(last.items())
    )
    return (
        '<h2 id="values">Last logged values</h2>'
        f'<table id="final-values"><tr><th>metric</th><th>step</th><th>value</th></tr>{rows}</table>'
    )


def _repr(value: Any) -> str:
    return escape(repr(value)) if isinstance(value, float) else escape(str(value))


def _shown(value: Any) -> str:
    if isinstance(value, float):
        return number(value) if math.isfinite(value) else str(value)
    return str(value)
