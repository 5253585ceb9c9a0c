"""distill: train the current model (the student) to match a teacher's next-token distributions.

Loss per token: alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * cross-entropy on the text,
plus hidden_weight * (normalized MSE between hidden states) when the hidden sizes agree. AdamW, linear
warmup then cosine (or constant) learning rate, gradient clipping. The teacher is the source model or an
earlier PyTorch stage (an ancestor in the plan: list it in `after`).

Training batches are drawn from the calibration windows (the corpus's train split): each row is a
random window and a random offset inside it, from a generator seeded with `seed`, so a run can see more
distinct sequences than the calibration section holds (samples x (window - seq_len + 1)). On the CPU,
with the same thread count, two runs give byte-identical weights.
"""
from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F

from recipec.core.params import prop
from recipec.passes.base import CheckContext, Pass, PassError, StageContext
from recipec.source.optim import adamw, lr_factor, train_step
from recipec.passes.torch.lm import eval_windows, load_lm, save_lm, score

SOURCE = "source"
LOSS_TAIL = 10  # the reported train loss is the mean of the last steps

PARAMS: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "teacher": prop("string", SOURCE, "The model to match: source (the model as loaded) or the id of an "
                                          "earlier PyTorch stage, which must run before this one (add it to "
                                          "`after`).", minLength=1),
        "steps": prop("integer", 200, "Optimizer steps.", minimum=1),
        "batch_size": prop("integer", 8, "Sequences per step.", minimum=1),
        "seq_len": prop(["integer", "null"], None, "Tokens per training sequence; null = the calibration "
                                                   "windows' length (the most it can be).", minimum=2),
        "learning_rate": prop("number", 0.0005, "Peak AdamW learning rate (write 0.0005, not 5e-4: YAML 1.1 "
                                                "reads 5e-4 as a string).", exclusiveMinimum=0),
        "schedule": {"enum": ["cosine", "constant"], "default": "cosine",
                     "description": "After warmup: cosine decay to min_lr_ratio of the peak, or constant."},
        "warmup_steps": prop("integer", 10, "Steps of linear warmup from 0 to the peak; fewer than steps.",
                             minimum=0),
        "min_lr_ratio": prop("number", 0.1, "cosine: the final learning rate as a fraction of the peak.",
                             minimum=0, maximum=1),
        "weight_decay": prop("number", 0.0, "AdamW weight decay on matrices (not norms or biases).", minimum=0),
        "grad_clip": prop("number", 1.0, "Maximum global gradient norm.", exclusiveMinimum=0),
        "temperature": prop("number", 1.0, "Softmax temperature of both distributions in the KL term.",
                            exclusiveMinimum=0),
        "alpha": prop("number", 1.0, "Weight of the KL term; 1 - alpha goes to the language-modelling loss "
                                     "on the text itself.", minimum=0, maximum=1),
        "hidden_weight": prop("number", 0.0, "Weight of a hidden-state loss (MSE divided by the teacher's "
                                             "mean square): every layer boundary when the layer counts agree, "
                                             "else the final hidden state. Needs equal hidden sizes.",
                              minimum=0),
        "seed": prop("integer", 0, "Seed of the batch order and of dropout.", minimum=0),
    },
}


def param_problems(params: dict[str, Any], calibration_window: int) -> list[tuple[tuple, str]]:
    """The rules on distill's parameters and the calibration windows it trains on, for validate and apply."""
    problems = []
    if params["warmup_steps"] >= params["steps"]:
        problems.append((("warmup_steps",), (f"warmup_steps ({params['warmup_steps']}) must be fewer than steps "
                                             f"({params['steps']})")))
    if (params["seq_len"] or 0) > calibration_window:
        problems.append((("seq_len",), (f"seq_len {params['seq_len']} is longer than the calibration windows "
                                        f"({calibration_window} tokens); lower it or raise data.calibration.seq_len")))
    return problems


def check(params: dict[str, Any], ctx: CheckContext) -> list[tuple[tuple, str]]:
    problems = param_problems(params, ctx.data["calibration"]["seq_len"])
    teacher = params["teacher"]
    if teacher == ctx.stage_id:
        problems.append((("teacher",), f"{teacher!r} cannot be its own teacher"))
    elif teacher not in ctx.upstream:
        earlier = sorted(s for s, kind in ctx.produces.items() if kind == "torch")
        problems.append((("teacher",), (f"teacher {teacher!r} is not a stage that runs before {ctx.stage_id!r}; "
                                        f"name one of {', '.join(earlier)}, or list {teacher!r} in `after` "
                                        f"(after: [<input>, {teacher}])")))
    elif ctx.produces[teacher] != "torch":
        problems.append((("teacher",), (f"teacher {teacher!r} is an ONNX stage ({ctx.upstream[teacher]}); the "
                                        "teacher must be a PyTorch model: source or a stage before the export")))
    return problems


def apply(ctx: StageContext) -> dict[str, Any]:
    p = ctx.params
    calibration = ctx.data.calibration()
    problems = param_problems(p, calibration.shape[1])
    if problems:
        raise PassError("distill: " + "; ".join(message for _, message in problems))
    student = load_lm(ctx.input_dir)
    teacher = load_lm(ctx.stage_dir(p["teacher"]))
    _check_compatible(student, teacher, p)
    windows = eval_windows(ctx.data)
    before = score(student, windows, teacher)
    seq_len = p["seq_len"] or calibration.shape[1]
    started = time.perf_counter()
    losses = train(student, teacher, calibration, seq_len, p, ctx.progress)
    seconds = time.perf_counter() - started
    after = score(student, windows, teacher)
    save_lm(student, ctx.input_dir, ctx.output_dir)
    ctx.log(f"distill from {p['teacher']}: KL {before['kl']:.4f} -> {after['kl']:.4f}, "
            f"perplexity {before['perplexity']:.2f} -> {after['perplexity']:.2f} in {seconds:.0f} s")
    tail = losses[-LOSS_TAIL:]
    return {"teacher": p["teacher"], "steps": p["steps"], "tokens_seen": p["steps"] * p["batch_size"] * seq_len,
            "train_seconds": round(seconds, 3), "initial_train_loss": losses[0],
            "train_loss": sum(tail) / len(tail),
            "teacher_eval_perplexity": after["reference_perplexity"],
            "eval_perplexity_before": before["perplexity"], "eval_perplexity_after": after["perplexity"],
            "eval_kl_to_teacher_before": before["kl"], "eval_kl_to_teacher_after": after["kl"]}


def _check_compatible(student, teacher, p: dict[str, Any]) -> None:
    s, t = student.config.get_text_config(), teacher.config.get_text_config()
    if s.vocab_size != t.vocab_size:
        raise PassError(f"distill: the teacher {p['teacher']!r} has vocab_size {t.vocab_size}, the student "
                        f"{s.vocab_size}; logits can only be matched over one vocabulary")
    if p["hidden_weight"] > 0 and s.hidden_size != t.hidden_size:
        raise PassError(f"distill: hidden_weight needs equal hidden sizes (teacher {t.hidden_size}, student "
                        f"{s.hidden_size}); set hidden_weight: 0")


def sample_batch(calibration: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    """batch_size rows, each a random window and a random offset inside it."""
    rows = torch.randint(0, calibration.shape[0], (batch_size,), generator=generator)
    starts = torch.randint(0, calibration.shape[1] - seq_len + 1, (batch_size, 1), generator=generator)
    return calibration[rows[:, None], starts + torch.arange(seq_len)]


def train(student, teacher, calibration: torch.Tensor, seq_len: int, p: dict[str, Any], progress) -> list[float]:
    torch.manual_seed(p["seed"])
    generator = torch.Generator().manual_seed(p["seed"])  # the batch order must not depend on dropout's draws
    optimizer = _optimizer(student, p)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr(step, p))
    losses = []
    student.train()
    teacher.eval()
    with progress("distilling", total=p["steps"]) as advance:
        for _ in range(p["steps"]):
            ids = sample_batch(calibration, p["batch_size"], seq_len, generator)
            losses.append(train_step(student, distill_loss(student, teacher, ids, p), optimizer, schedule, p["grad_clip"]))
            advance(1, loss=round(losses[-1], 4))
    student.eval()
    return losses


def _optimizer(model, p: dict[str, Any]) -> torch.optim.AdamW:
    return adamw(model, p, betas=(0.9, 0.999))  # torch's default betas, which distill has always trained with


def _lr(step: int, p: dict[str, Any]) -> float:
    # constant = the cosine schedule with its floor at the peak: the same warmup, then exactly 1.0
    return lr_factor(step, {**p, "min_lr_ratio": 1.0} if p["schedule"] == "constant" else p)


def distill_loss(student, teacher, ids: torch.Tensor, p: dict[str, Any]) -> torch.Tensor:
    hidden = p["hidden_weight"] > 0
    with torch.no_grad():
        t_out = teacher(input_ids=ids, output_hidden_states=hidden)
    s_out = student(input_ids=ids, output_hidden_states=hidden)
    temperature, alpha = p["temperature"], p["alpha"]
    s_logits, t_logits = s_out.logits.float(), t_out.logits.float()
    vocab = s_logits.shape[-1]
    loss = s_logits.new_zeros(())
    if alpha > 0:
        kl = F.kl_div(F.log_softmax(s_logits / temperature, -1).reshape(-1, vocab),
                      F.log_softmax(t_logits / temperature, -1).reshape(-1, vocab),
                      log_target=True, reduction="batchmean")
        loss = loss + alpha * temperature ** 2 * kl
    if alpha < 1:
        lm = F.cross_entropy(s_logits[:, :-1].reshape(-1, vocab), ids[:, 1:].reshape(-1))
        loss = loss + (1 - alpha) * lm
    if hidden:
        loss = loss + p["hidden_weight"] * _hidden_loss(s_out.hidden_states, t_out.hidden_states)
    return loss


def _hidden_loss(student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Normalized MSE at every layer boundary when the depths agree, else at the final hidden state only
    (which boundaries of a shallower student match which of the teacher is not defined)."""
    pairs = list(zip(student, teacher)) if len(student) == len(teacher) else [(student[-1], teacher[-1])]
    return sum(F.mse_loss(s, t) / t.pow(2).mean().clamp_min(1e-12) for s, t in pairs) / len(pairs)


PASS = Pass(
    op="distill",
    consumes="torch",
    produces="torch",
    params=PARAMS,
    apply=apply,
    summary="knowledge distillation from the source or an earlier stage (docs/torch-passes.md)",
    uses_data=("calibration", "eval"),
    check=check,
)
