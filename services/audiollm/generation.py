"""What a generation request means, checked, and how its text comes out: the parts of serving the audio
LLM that need no gRPC context and no model thread.

:func:`check_prompt` refuses a prompt the model cannot take *before* it waits for the model (empty
of words, too long, control characters, the model's special tokens — ``<SpeechHere>`` inside a
prompt would be read as an audio position and break the prompt's layout). :func:`instruction`
turns (task, prompt) into the instruction SALMONN's template wraps; :func:`sampling` turns the
request's zero-means-default numbers into ``generate``'s keywords.

:class:`TextDeltas` is the ``generate`` streamer: it runs on the service's model thread, records
when each token came (time to first token, time per output token) and hands text deltas to the
event loop. A delta is only ever appended: the text so far is decoded whole at every token and the
new part sent, holding back trailing whitespace (the final text is stripped) and a trailing
``U+FFFD`` (a multi-byte character whose bytes have not all come), so the concatenated deltas equal
:meth:`TextDeltas.text`, the text ``Generate`` answers with.

:class:`StopCheck` is how a deadline or a cancelled call stops decoding: a ``StoppingCriteria``
(Llama's ``generate`` runs it after every token) that raises
:class:`~dramaturg.shared.cancellation.Stopped` instead of ending the answer early as if it were
complete.
"""

from __future__ import annotations

import functools
import math
import time
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from dramaturg.audiollm.v1 import audiollm_pb2
from dramaturg.shared.cancellation import ShouldStop, Stopped
from dramaturg.shared.grpc.errors import echo, invalid_argument
from prometheus_client import Counter, Gauge, Histogram

Task = audiollm_pb2.Task

#: The task's SALMONN instruction (``prompt.TASK_INSTRUCTIONS`` key); None: the prompt is the instruction.
TASKS: dict[int, str | None] = {
    Task.TASK_UNSPECIFIED: None,
    Task.TRANSCRIBE: "asr",
    Task.CAPTION: "audiocaption_v2",
    Task.ANSWER: None,
}
TASK_HELP = (
    "TASK_UNSPECIFIED (0: the prompt is the instruction), TRANSCRIBE (1), CAPTION (2), "
    "ANSWER (3: the prompt is the question)"
)
_MAX_LISTED = 10

# -- metrics: the shared families (dramaturg_real_time_factor, dramaturg_audio_seconds_total, the
# limiter's dramaturg_queue_depth = requests waiting) plus what only a text generator has.
TIME_TO_FIRST_TOKEN = Histogram(
    "dramaturg_audiollm_time_to_first_token_seconds",
    "From the request's arrival to its first generated token (queueing, audio encoding and prefill).",
    ("method",),
    buckets=(0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30, 60),
)
TIME_PER_OUTPUT_TOKEN = Histogram(
    "dramaturg_audiollm_time_per_output_token_seconds",
    "Mean seconds per generated token after the first, per request.",
    ("method",),
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1),
)
PROMPT_TOKENS = Counter(
    "dramaturg_audiollm_prompt_tokens_total", "Prompt tokens read (audio tokens included).", ("method",)
)
GENERATION_TOKENS = Counter("dramaturg_audiollm_generation_tokens_total", "Tokens generated.", ("method",))
RUNNING = Gauge("dramaturg_audiollm_requests_running", "Generations running on the model now.")


@dataclass(frozen=True)
class PromptRules:
    """What prompt text a loaded model accepts: its special tokens and the length cap."""

    max_chars: int
    special_tokens: tuple[str, ...]


def prompt_rules(tokenizer: Any, extra_specials: Sequence[str], max_chars: int) -> PromptRules:
    specials = {str(t) for t in getattr(tokenizer, "all_special_tokens", ())}
    specials |= {str(t) for t in getattr(tokenizer, "get_added_vocab", dict)()}
    specials |= {str(t) for t in extra_specials}
    return PromptRules(max_chars, tuple(sorted(t for t in specials if t)))


def _name(char: str) -> str:
    return f"{char!r} (U+{ord(char):04X} {unicodedata.name(char, 'unnamed')})"


def check_prompt(prompt: str, field_path: str, rules: PromptRules) -> str:
    """``prompt`` if the model can take it (empty is allowed here: whether it is needed depends on the
    task), else INVALID_ARGUMENT on ``field_path`` saying what to change."""
    if prompt and not prompt.strip():
        raise invalid_argument(
            field_path, "holds only whitespace: send an instruction or a question, or nothing"
        )
    if len(prompt) > rules.max_chars:
        raise invalid_argument(
            field_path, f"is {len(prompt)} characters long; at most {rules.max_chars} per request"
        )
    controls = sorted({c for c in prompt if unicodedata.category(c) == "Cc" and c not in "\t\n\r"})
    if controls:
        named = ", ".join(_name(c) for c in controls[:_MAX_LISTED])
        raise invalid_argument(field_path, f"holds control characters: {named}")
    specials = [t for t in rules.special_tokens if t in prompt]
    if specials:
        raise invalid_argument(
            field_path,
            f"holds the model's special token(s) {', '.join(echo(t) for t in specials[:_MAX_LISTED])}; "
            "they would be read as prompt structure (the audio goes where the template puts it): remove them",
        )
    return prompt.strip()


def check_task(task: int) -> int:
    if task not in TASKS:
        raise invalid_argument("task", f"{task} is not a task; use one of {TASK_HELP}")
    return task


def instruction(task: int, prompt: str, task_instructions: dict[str, str]) -> str:
    """The instruction for (task, prompt), both checked on their own already; INVALID_ARGUMENT when
    they do not fit together."""
    key = TASKS[task]
    name = Task.Name(task)
    if key is not None:
        if prompt:
            raise invalid_argument(
                "prompt",
                f"is set with task {name}, which has its own instruction; leave prompt empty, or use "
                "TASK_UNSPECIFIED with your own instruction",
            )
        return task_instructions[key]
    if not prompt:
        what = "the question about the audio" if task == Task.ANSWER else "an instruction"
        raise invalid_argument(
            "prompt", f"is empty: task {name} needs {what} in prompt; or set task to one of {TASK_HELP}"
        )
    return prompt


@dataclass(frozen=True)
class Sampling:
    """Resolved decoding settings; temperature 0 is greedy."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 0.0
    top_k: int = 0
    repetition_penalty: float = 0.0
    seed: int = 0

    @property
    def batchable(self) -> bool:
        """Greedy without a repetition penalty: rows of one batched ``generate`` decode exactly as they
        would alone (a sampled request's seed draws from the batch's one random stream)."""
        return self.temperature <= 0 and self.repetition_penalty in (0.0, 1.0)

    def generate_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens}
        if self.temperature > 0:
            kwargs.update(do_sample=True, temperature=self.temperature, top_k=self.top_k or None,
                          top_p=self.top_p if 0 < self.top_p < 1 else None)
        else:
            kwargs.update(do_sample=False, temperature=None, top_k=None, top_p=None)
        if self.repetition_penalty > 0 and self.repetition_penalty != 1:
            kwargs["repetition_penalty"] = self.repetition_penalty
        return kwargs


def sampling(
    config: audiollm_pb2.GenerationConfig, settings: Any, random_seed: Callable[[], int]
) -> Sampling:
    """The request's numbers with 0 = the default; INVALID_ARGUMENT on nonsense or above the cap."""
    temperature = float(config.temperature)
    if not math.isfinite(temperature) or temperature < 0:
        raise invalid_argument(
            "generation.temperature", f"{temperature:g} is not a temperature: use ≥ 0 (0 = greedy decoding)"
        )
    top_p = float(config.top_p)
    if not math.isfinite(top_p) or not 0 <= top_p <= 1:
        raise invalid_argument(
            "generation.top_p", f"{top_p:g} is outside [0, 1] (0 or 1 = no nucleus filter)"
        )
    if config.top_k < 0:
        raise invalid_argument(
            "generation.top_k", f"{config.top_k} is negative: use ≥ 1 (0 = no top-k filter)"
        )
    penalty = float(config.repetition_penalty)
    if not math.isfinite(penalty) or penalty < 0:
        raise invalid_argument(
            "generation.repetition_penalty", f"{penalty:g} is not a penalty: use > 0 (0 or 1 = none)"
        )
    tokens = int(config.max_new_tokens)
    if tokens < 0:
        raise invalid_argument("generation.max_new_tokens", f"{tokens} is negative (0 = the default)")
    if tokens > settings.max_new_tokens:
        raise invalid_argument(
            "generation.max_new_tokens",
            f"{tokens} is above this service's cap of {settings.max_new_tokens} new tokens; ask for fewer",
        )
    seed = 0
    if temperature > 0:
        seed = int(config.seed) or random_seed()
    return Sampling(
        max_new_tokens=tokens or settings.default_max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=int(config.top_k),
        repetition_penalty=penalty,
        seed=seed,
    )


class TextDeltas:
    """A ``generate`` streamer (``put`` / ``end``, called on the model thread): token times, the generated
    ids, and appended-only text deltas handed to ``on_delta(delta, token_index)``."""

    def __init__(self, tokenizer: Any, on_delta: Callable[[str, int], None] | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.tokenizer = tokenizer
        self.on_delta = on_delta
        self.clock = clock
        self.ids: list[int] = []
        self.sent = ""
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self._prompt_seen = False

    def put(self, value: Any) -> None:
        if not self._prompt_seen:  # generate's first put is the prompt
            self._prompt_seen = True
            return
        now = self.clock()
        self.first_token_at = self.first_token_at or now
        self.last_token_at = now
        self.ids.extend(int(i) for i in value.reshape(-1).tolist())
        if self.on_delta is not None:
            shown = self._decode().strip()
            if shown.endswith("\ufffd") or not shown.startswith(self.sent):
                return  # an incomplete character (or a decode that changed its past): wait for more
            self._send(shown)

    def end(self) -> None:
        pass

    def _decode(self) -> str:
        return str(self.tokenizer.decode(self.ids, skip_special_tokens=True))

    def _send(self, shown: str) -> None:
        delta = shown[len(self.sent):]
        if delta and self.on_delta is not None:
            self.sent = shown
            self.on_delta(delta, len(self.ids) - 1)

    def text(self) -> str:
        """The answer: every generated token decoded, special tokens dropped, stripped."""
        return self._decode().strip()

    def rest(self) -> str:
        """What the deltas have not sent of :meth:`text` (the final message's delta)."""
        text = self.text()
        return text[len(self.sent):] if text.startswith(self.sent) else ""


class StopCheck:
    """A ``StoppingCriteria`` that never ends the answer and raises ``Stopped`` once the call should stop.

    Built by :func:`stop_check` (transformers is imported only when a generation runs).
    """

    def __init__(self, should_stop: ShouldStop) -> None:
        self.should_stop = should_stop
        self.steps = 0

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        reason = self.should_stop()
        if reason:
            raise Stopped(reason)
        self.steps += 1
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


@functools.cache
def _stop_check_class() -> type:
    from transformers import StoppingCriteria

    return type("GenerationStopCheck", (StopCheck, StoppingCriteria), {})


def stop_check(should_stop: ShouldStop) -> Any:
    """A :class:`StopCheck` that is also a transformers ``StoppingCriteria`` (generate merges by type)."""
    return _stop_check_class()(should_stop)


class StepTimes:
    """A ``generate`` streamer for a batch: when each decoding step produced its tokens."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value: Any) -> None:
        if not self._prompt_seen:  # generate's first put is the prompt
            self._prompt_seen = True
            return
        self.times.append(self.clock())

    def end(self) -> None:
        pass


class RowStops:
    """A batch's ``StoppingCriteria``: a row is done at its own ``max_new_tokens`` or once its caller
    should stop (``should_stop()`` non-empty: deadline, cancelled call); ``generate`` pads a done row
    and ends when every row is done. ``stopped[i]`` says why row i was stopped early ("" if it was not).
    Built by :func:`row_stops`.
    """

    def __init__(self, prompt_length: int, limits: Sequence[int], should_stop: Sequence[ShouldStop]) -> None:
        self.prompt_length = prompt_length
        self.limits = list(limits)
        self.should_stop = list(should_stop)
        self.stopped = [""] * len(self.limits)

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        produced = input_ids.shape[1] - self.prompt_length
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for row, (limit, stop) in enumerate(zip(self.limits, self.should_stop, strict=True)):
            if produced >= limit:
                done[row] = True
            elif not self.stopped[row]:
                self.stopped[row] = stop() or ""
            if self.stopped[row]:
                done[row] = True
        return done


@functools.cache
def _row_stops_class() -> type:
    from transformers import StoppingCriteria

    return type("GenerationRowStops", (RowStops, StoppingCriteria), {})


def row_stops(prompt_length: int, limits: Sequence[int], should_stop: Sequence[ShouldStop]) -> Any:
    """A :class:`RowStops` that is also a transformers ``StoppingCriteria``."""
    return _row_stops_class()(prompt_length, limits, should_stop)
