"""RegCache (Kim et al., "Activation Quantization of Vision Encoders Needs Prefixing Registers",
arXiv 2510.04547): cached key/value registers in front of the middle-to-late attentions, and
deletion of the few massive tokens at the sensitive block's input, so that per-tensor activation
scales stop being set by sink tokens.

Offline, on the calibration set (`apply`):
  a. sensitive layer l_q: each block's MLP output projection (fc2, where massive activations
     enter the residual stream) is quantized alone, by the recipe's own quantizer restricted to
     it, and the final embedding is compared with full precision. Sinks grow over 2-3 blocks,
     whose fc2s are then about equally sensitive, and a deletion at the first of them removes the
     sinks from all: l_q is the earliest block whose fc2 costs at least half the worst one's
     fidelity. Measured, not guessed from an index. Only fc2: a block can be fragile for reasons
     a prefix and a deletion cannot touch (the planted fixture's first block selects the sinks
     with a sharp attention that 4-6-bit quantization perturbs more than any sink does);
  b. candidates: the `candidate_top_k` tokens of largest l_inf norm at the output of l_q and of up
     to 3 blocks before it (never the leading special tokens, never padding);
  c. registers: the full-precision keys and values of those tokens at every attention, averaged
     into one (K_reg, V_reg) per block and head;
  d. prefix: from `prefix_start` to the last block every attention sees `num_registers` (tau)
     copies of its register in front of its keys and values. Copies are identical, so one entry
     whose logit is raised by log(tau) gives the same softmax and output at 1/tau of the cost;
  e. deletion: at l_q's input each image loses its `delete_tokens` (k~) largest tokens; with
     `refill: neighbours` the last block gives back every position (dense outputs).
`auto` fields are searched with the quantizer in the loop (coordinate line searches over k~ in
0..10, tau in 1..15 and prefix_start in l_q-2..l_q+1, from a measured starting point), so the
chosen values fit the backend that ships.

Cost: the sensitivity scan and the trials run on subsets of the calibration images sized by a
budget of full passes (half of each subset is the images with the most massive tokens, since
they set static activation scales), and every trial starts from cached hidden states: the
residual stream entering the first block the trial changes is computed once per such block (in
full precision for the observers, through the quantized earlier blocks for evaluation), so a
trial calibrates and runs only the blocks from there on. The report gives the measured cost in
full-precision passes over the calibration set.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import logging
import math
import re
import time
from dataclasses import dataclass
from typing import Annotated, Any, Iterator, Literal, Union

import torch
from pydantic import BaseModel, BeforeValidator, ConfigDict
from torch import nn
from tqdm.auto import tqdm

from quantsink.errors import CheckpointError, UserError
from quantsink.methods.base import Method, MethodContext
from quantsink.models.base import Adapter, KVPrefix, hidden_states_of
from quantsink.models.handles import HandleSet, installing
from quantsink.models.probe import Tally, require_runs
from quantsink.quantizers.base import Quantizer, target_linears
from quantsink.recipe import PositiveInt
from quantsink.registry import METHODS

log = logging.getLogger(__name__)

AUTO = "auto"
CANDIDATE_BLOCKS_BEFORE = 3  # step b: l_q and up to this many blocks before it
START_BEFORE, START_AFTER = 2, 1  # auto prefix_start: l_q - 2 .. l_q + 1
REGISTER_LADDER = (1, 2, 3, 4, 6, 8, 11, 15)  # auto tau, 1..15
DELETE_LADDER = tuple(range(11))  # auto k~, 0..10
# The initial k~ counts, per image, the tokens at l_q's output whose l_inf norm exceeds this many
# times the median token's: the massive tokens the deletion is meant for.
MASSIVE_RATIO = 10.0
SENSITIVE_SHARE = 0.5  # l_q: the earliest fc2 whose sensitivity reaches this share of the largest
MAX_TRIALS = 12  # quantized trials of the hyperparameter search
# Budget, in full-precision passes over the whole calibration set, of each search stage; with
# the reference and register passes (one each) the search is planned at 6 passes, leaving room
# for what this model of its cost leaves out (quantizer arithmetic and observers, Python) under
# the 10 calibration passes.
SENSITIVITY_PASSES = 1.0
TRIAL_PASSES = 3.0
MIN_SEARCH_SAMPLES = 8

Batch = dict[str, torch.Tensor]


def _auto_or_integer(low: int, high: int | None):
    def check(value: Any) -> Any:
        if value == AUTO:
            return value
        in_range = isinstance(value, int) and not isinstance(value, bool) and low <= value and (high is None or value <= high)
        if not in_range:
            bounds = f"{low}-{high}" if high is not None else f">= {low}"
            raise ValueError(f"expected 'auto' or an integer {bounds}, got {value!r}")
        return value

    return BeforeValidator(check)


class RegCacheOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sensitive_layer: Annotated[Union[int, Literal["auto"]], _auto_or_integer(0, None)] = AUTO
    prefix_start: Annotated[Union[int, Literal["auto"]], _auto_or_integer(0, None)] = AUTO
    num_registers: Annotated[Union[int, Literal["auto"]], _auto_or_integer(REGISTER_LADDER[0], REGISTER_LADDER[-1])] = AUTO
    delete_tokens: Annotated[Union[int, Literal["auto"]], _auto_or_integer(DELETE_LADDER[0], DELETE_LADDER[-1])] = AUTO
    candidate_top_k: PositiveInt = 100
    refill: Literal["none", "neighbours"] = "none"


@dataclass(frozen=True)
class RegCacheSettings:
    """What gets installed. `num_registers` 0 leaves the prefix out and `delete_tokens` 0 the
    deletion (the prefix-only and delete-only ablations; recipes always ask for a prefix)."""

    sensitive_layer: int
    prefix_start: int
    num_registers: int
    delete_tokens: int
    refill: str = "none"


@dataclass
class Registers:
    """One register per block from `first_block` on: (blocks, heads, head_dim) keys and values."""

    keys: torch.Tensor
    values: torch.Tensor
    first_block: int

    def prefix(self, block: int, copies: int) -> KVPrefix:
        """Block `block`'s register standing for `copies` identical entries (a log(copies) logit weight)."""
        index = block - self.first_block
        weight = None if copies == 1 else torch.tensor([math.log(copies)], dtype=self.keys.dtype)
        return KVPrefix(self.keys[index][:, None], self.values[index][:, None], weight, Tally(f"the register prefix of block {block}"))

    def from_block(self, block: int) -> "Registers":
        index = block - self.first_block
        return Registers(self.keys[index:], self.values[index:], block)


def install(adapter: Adapter, settings: RegCacheSettings, registers: Registers) -> HandleSet:
    """Put RegCache on `adapter`'s model, proven by a probe forward to run; `.remove()` (or the
    end of a `with` block) takes it off."""
    with installing(adapter.model, "regcache") as handles:
        tallies = []
        if settings.num_registers:
            for block in range(settings.prefix_start, adapter.num_blocks):
                prefix = registers.prefix(block, settings.num_registers)
                adapter.set_kv_prefix(block, prefix)
                handles.on_remove(functools.partial(adapter.set_kv_prefix, block, None))
                tallies.append(prefix.tally)
        if settings.delete_tokens:
            deletion = handles.add(adapter.delete_tokens_at(settings.sensitive_layer, settings.delete_tokens, settings.refill))
            tallies.append(deletion.tally)
        require_runs(adapter.model, tallies, lambda: adapter.embed(adapter.probe_inputs()))
    return handles


@METHODS.register("regcache")
class RegCache(Method):
    name = "regcache"
    options_model = RegCacheOptions

    def __init__(self, options: RegCacheOptions):
        super().__init__(options)
        self.settings: RegCacheSettings | None = None
        self.registers: Registers | None = None
        self.report: dict[str, Any] = {}

    def apply(self, context: MethodContext) -> dict[str, Any]:
        adapter = context.adapter
        if adapter.modality != "image":
            raise UserError(
                f"regcache applies to vision encoders (image patches and their sink tokens); {adapter.source.spec} "
                "is a text model: remove regcache from the recipe's methods"
            )
        started = time.perf_counter()
        search = _Search(context, self.options)
        self.settings, self.registers, self.report = search.run()
        before = search.sequence_maxima(self.settings.sensitive_layer)
        install(adapter, self.settings, self.registers)
        self.report["max_token_linf_at_sensitive_layer"] = {
            "before": before, "after": search.sequence_maxima(self.settings.sensitive_layer)
        }
        seconds = time.perf_counter() - started
        # the unit is a full-precision pass over the calibration set with statistics hooks; the
        # pipeline's calibration pass adds the quantizer's observers, so it is the larger unit
        self.report["cost"] = {
            "seconds": seconds,
            "reference_pass_seconds": search.pass_seconds,
            "reference_passes": seconds / search.pass_seconds,
            **search.cost_details(),
        }
        log.info(
            "regcache: l_q=%d, prefix from block %d, tau=%d, k~=%d; cost %.1f full-precision passes",
            self.settings.sensitive_layer, self.settings.prefix_start, self.settings.num_registers,
            self.settings.delete_tokens, self.report["cost"]["reference_passes"],
        )
        return self.report

    def state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        registers = self.registers.from_block(self.settings.prefix_start)
        return (
            {"settings": dataclasses.asdict(self.settings), "report": self.report},
            {"keys": registers.keys.contiguous(), "values": registers.values.contiguous()},
        )

    @classmethod
    def restore(cls, adapter: Adapter, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> "RegCache":
        try:
            settings = RegCacheSettings(**state["settings"])
            registers = Registers(tensors["keys"], tensors["values"], settings.prefix_start)
        except (KeyError, TypeError) as error:
            raise CheckpointError(f"the regcache state lacks {error}: re-export the folder") from None
        if registers.keys.shape[0] != adapter.num_blocks - settings.prefix_start:
            raise CheckpointError(
                f"the regcache registers cover {registers.keys.shape[0]} blocks, the model has "
                f"{adapter.num_blocks - settings.prefix_start} from block {settings.prefix_start}: re-export the folder"
            )
        method = cls(RegCacheOptions.model_construct(**dataclasses.asdict(settings)))
        method.settings, method.registers, method.report = settings, registers, state.get("report", {})
        install(adapter, settings, registers)
        return method


@dataclass
class _Profile:
    """What one full-precision pass over the calibration set shows."""

    embeddings: torch.Tensor  # (samples, dim)
    token_linf: list[torch.Tensor]  # [block] (samples, tokens) l_inf norm at the block's output
    deletable: torch.Tensor  # (samples, tokens): neither leading special token nor padding
    fc2_input_max: list[float]  # [block] largest |x| entering fc2
    before_blocks: set[str]  # targeted Linears outside the blocks that run before block 0


class _Search:
    """Steps a-c and the search of the `auto` fields, on `context.adapter`'s model in place (trial
    quantizers work on copies of its Linears, which are put back after each trial)."""

    def __init__(self, context: MethodContext, options: RegCacheOptions):
        self.context, self.options = context, options
        self.adapter = context.adapter
        self.model = context.adapter.model
        self.blocks = self.adapter.num_blocks
        self.quantizer_type = type(context.make_quantizer())
        self.targets = list(target_linears(self.model, context.recipe.quantization))
        self.trials: dict[RegCacheSettings, float] = {}
        self.passes: dict[str, float] = {}  # modelled cost of each stage, in full passes
        self.sensitivity_samples = self.trial_samples = 0
        self.inputs: list[Batch] = []  # the trial images
        self.caches: dict[int, tuple[list[torch.Tensor], list[torch.Tensor], list[str]]] = {}
        for field in ("sensitive_layer", "prefix_start"):
            value = getattr(options, field)
            if value != AUTO and value >= self.blocks:
                raise UserError(f"regcache.{field}: {value} is not a block of this model (it has {self.blocks})")

    # --- the whole search -----------------------------------------------------------------
    def run(self) -> tuple[RegCacheSettings, Registers, dict[str, Any]]:
        batches = self.context.calibration_batches
        self.samples = sum(_batch_size(batch) for batch in batches)
        started = time.perf_counter()
        self.profile = self._profile(batches)
        self.pass_seconds = time.perf_counter() - started
        self.passes["reference"] = 1.0
        with tqdm(desc="regcache search", unit="trial", disable=not self.context.progress) as self.bar:
            if self.options.sensitive_layer == AUTO:
                sensitivity = self._sensitivity()
                sensitive = next(block for block, cost in enumerate(sensitivity) if cost >= SENSITIVE_SHARE * max(sensitivity))
            else:
                sensitivity, sensitive = None, self.options.sensitive_layer
            starts = self._start_range(sensitive)
            first = min(starts[0], sensitive)
            candidates = self._candidates(sensitive)
            registers = self._registers(candidates, first)
            massive = int(self._massive_counts(sensitive).max())
            initial = RegCacheSettings(
                sensitive_layer=sensitive,
                prefix_start=sensitive if sensitive in starts else starts[0],
                num_registers=_nearest(REGISTER_LADDER, massive) if self.options.num_registers == AUTO else self.options.num_registers,
                delete_tokens=_nearest(DELETE_LADDER, massive) if self.options.delete_tokens == AUTO else self.options.delete_tokens,
                refill=self.options.refill,
            )
            self.registers = registers
            best = self._search(initial, starts, first)
        report = {
            "sensitive_layer": best.sensitive_layer,
            "prefix_start": best.prefix_start,
            "num_registers": best.num_registers,
            "delete_tokens": best.delete_tokens,
            "refill": best.refill,
            "searched": [field for field in ("sensitive_layer", "prefix_start", "num_registers", "delete_tokens")
                         if getattr(self.options, field) == AUTO],
            "fc2_input_max": self.profile.fc2_input_max,
            "sensitivity": sensitivity,
            "candidates": {"tokens": len(candidates), "massive": self._massive_candidates(candidates, sensitive),
                           "blocks": list(self._candidate_blocks(sensitive))},
            "massive_tokens_per_image": {"max": massive, "mean": self._massive_counts(sensitive).float().mean().item()},
            "trials": [{**dataclasses.asdict(settings), "cosine_distance": score} for settings, score in self.trials.items()],
        }
        return best, registers, report

    def cost_details(self) -> dict[str, Any]:
        return {
            "planned_passes": sum(self.passes.values()),
            "sensitivity_samples": self.sensitivity_samples,
            "trial_samples": self.trial_samples,
            "quantized_trials": len(self.trials),
        }

    # --- reference pass -------------------------------------------------------------------
    @torch.no_grad()
    def _profile(self, batches: list[Batch]) -> _Profile:
        adapter = self.adapter
        token_linf: list[list[torch.Tensor]] = [[] for _ in range(self.blocks)]
        fc2_max = [0.0] * self.blocks
        order: list[str] = []
        outside = {name for name in self.targets if not any(name.startswith(block + ".") for block in adapter.block_names())}

        def on_block(index: int):
            def hook(_module: nn.Module, _args: tuple, output: Any) -> None:
                token_linf[index].append(hidden_states_of(output).abs().amax(dim=-1))
            return hook

        def on_fc2(index: int):
            def hook(_module: nn.Module, args: tuple) -> None:
                fc2_max[index] = max(fc2_max[index], args[0].abs().max().item())
            return hook

        def note(name: str):
            return lambda _module, _args: order.append(name)

        handles = [block.register_forward_hook(on_block(i)) for i, block in enumerate(adapter.blocks())]
        handles += [adapter.fc2(i).register_forward_pre_hook(on_fc2(i)) for i in range(self.blocks)]
        handles += [self.model.get_submodule(name).register_forward_pre_hook(note(name)) for name in outside]
        handles.append(adapter.blocks()[0].register_forward_pre_hook(note("")))
        embeddings, deletable = [], []
        try:
            for batch in batches:
                order.clear()
                embeddings.append(adapter.embed(batch))
                deletable.append(self._deletable(batch, token_linf[0][-1].shape))
        finally:
            for handle in handles:
                handle.remove()
        before = set(order[: order.index("")]) if "" in order else set()
        return _Profile(torch.cat(embeddings), [torch.cat(norms) for norms in token_linf], torch.cat(deletable), fc2_max, before)

    def _deletable(self, batch: Batch, shape: torch.Size) -> torch.Tensor:
        mask = self.adapter.token_mask(batch)
        deletable = torch.ones(shape, dtype=torch.bool) if mask is None else mask.bool().clone()
        deletable[:, : self.adapter.num_prefix_tokens] = False
        return deletable

    # --- step a: the sensitive block ------------------------------------------------------
    def _sensitivity(self) -> list[float]:
        # per block: calibrate it alone, evaluate from it to the embedding, advance the cache
        cost = sum(2 + self.blocks - block for block in range(self.blocks)) / self.blocks
        largest = self._largest_token(range(self.blocks))
        inputs, reference = self._subset(SENSITIVITY_PASSES / cost, largest.argsort(descending=True, stable=True).tolist())
        self.sensitivity_samples = _count(inputs)
        self.passes["sensitivity"] = cost * self.sensitivity_samples / self.samples
        self.bar.total = (self.bar.total or 0) + self.blocks
        cache = [self.adapter.hidden_before(0, batch) for batch in inputs]
        scores = []
        names_of = {id(module): name for name, module in self.model.named_modules()}
        for block in range(self.blocks):
            names = [name for name in [names_of[id(self.adapter.fc2(block))]] if name in self.targets]
            if names:
                with self._quantized(names) as quantizer:
                    with quantizer.calibrating(self.model):
                        for batch, hidden in zip(inputs, cache):
                            self.adapter.hidden_before(block + 1, batch, resume=(block, hidden))
                    quantizer.freeze(self.model)
                    embeddings = [self.adapter.run_from(block, hidden, batch) for batch, hidden in zip(inputs, cache)]
                scores.append(_cosine_distance(reference, torch.cat(embeddings)))
            else:
                scores.append(0.0)
            if block + 1 < self.blocks:
                cache = [self.adapter.hidden_before(block + 1, batch, resume=(block, hidden)) for batch, hidden in zip(inputs, cache)]
            self.bar.update()
        if not any(scores):
            raise UserError("regcache.sensitive_layer: auto needs the fc2 Linears among quantization.targets; set it to a block index")
        return scores

    # --- steps b and c: candidates and registers ------------------------------------------
    def _candidate_blocks(self, sensitive: int) -> range:
        return range(max(0, sensitive - CANDIDATE_BLOCKS_BEFORE), sensitive + 1)

    def _candidates(self, sensitive: int) -> set[tuple[int, int]]:
        """(image, token) of the top-k tokens by l_inf norm at each candidate block."""
        images, tokens = self.profile.deletable.nonzero(as_tuple=True)
        chosen: set[tuple[int, int]] = set()
        for block in self._candidate_blocks(sensitive):
            norms = self.profile.token_linf[block][images, tokens]
            top = norms.topk(min(self.options.candidate_top_k, len(norms))).indices
            chosen.update(zip(images[top].tolist(), tokens[top].tolist()))
        if not chosen:
            raise UserError("regcache found no candidate tokens: the calibration images have no patch tokens")
        return chosen

    @torch.no_grad()
    def _registers(self, candidates: set[tuple[int, int]], first: int) -> Registers:
        """Full-precision keys and values of the candidates at every block from `first`, averaged;
        only the images that hold candidates are run."""
        hosts = sorted({image for image, _ in candidates})
        sums: dict[int, list[torch.Tensor]] = {}
        where: dict[str, torch.Tensor] = {}

        def observe(block: int, keys: torch.Tensor, values: torch.Tensor) -> None:
            picked = [tensor[where["images"], :, where["tokens"]].double().sum(dim=0) for tensor in (keys, values)]
            sums[block] = picked if block not in sums else [total + part for total, part in zip(sums[block], picked)]

        size = _batch_size(self.context.calibration_batches[0])
        with self.adapter.observing_kv(range(first, self.blocks), observe):
            for start in range(0, len(hosts), size):
                row = {image: row for row, image in enumerate(hosts[start : start + size])}
                pairs = [(row[image], token) for image, token in sorted(candidates) if image in row]
                where["images"], where["tokens"] = torch.tensor(pairs).T
                self.adapter.embed(self._images(list(row))[0])
        self.passes["registers"] = len(hosts) / self.samples
        dtype = self.profile.embeddings.dtype
        keys = torch.stack([sums[block][0] / len(candidates) for block in range(first, self.blocks)]).to(dtype)
        values = torch.stack([sums[block][1] / len(candidates) for block in range(first, self.blocks)]).to(dtype)
        return Registers(keys, values, first)

    def _massive_threshold(self, sensitive: int) -> torch.Tensor:
        return MASSIVE_RATIO * self.profile.token_linf[sensitive][self.profile.deletable].median()

    def _massive_candidates(self, candidates: set[tuple[int, int]], sensitive: int) -> int:
        """How many candidates are massive at l_q's output; the registers stand for those, so
        ordinary tokens among the candidates dilute them."""
        threshold = self._massive_threshold(sensitive)
        massive = sum(bool(self.profile.token_linf[sensitive][image, token] > threshold) for image, token in candidates)
        if massive < len(candidates) / 2:
            log.warning(
                "regcache: only %d of the %d candidate tokens are massive at block %d, so the registers mostly "
                "average ordinary tokens: lower candidate_top_k or calibrate on more images", massive, len(candidates), sensitive,
            )
        return massive

    def _massive_counts(self, sensitive: int) -> torch.Tensor:
        """Per image, its tokens at l_q's output above MASSIVE_RATIO x the median token. The
        largest count starts the k~ search: static scales are set by the worst image."""
        massive = self.profile.token_linf[sensitive] > self._massive_threshold(sensitive)
        return (massive & self.profile.deletable).sum(dim=-1)

    def _largest_token(self, blocks: range) -> torch.Tensor:
        """Per image, its largest token l_inf norm at the output of `blocks`."""
        return torch.stack([self.profile.token_linf[block].masked_fill(~self.profile.deletable, 0).amax(dim=-1)
                            for block in blocks]).amax(dim=0)

    # --- the search of the auto fields ----------------------------------------------------
    def _start_range(self, sensitive: int) -> list[int]:
        if self.options.prefix_start != AUTO:
            return [self.options.prefix_start]
        return list(range(max(0, sensitive - START_BEFORE), min(self.blocks - 1, sensitive + START_AFTER) + 1))

    def _search(self, initial: RegCacheSettings, starts: list[int], first: int) -> RegCacheSettings:
        """Coordinate line searches over the auto fields from `initial`, on a subset of the
        calibration images; no trial changes a block before `first`."""
        ladders = {
            "delete_tokens": DELETE_LADDER if self.options.delete_tokens == AUTO else None,
            "num_registers": REGISTER_LADDER if self.options.num_registers == AUTO else None,
            "prefix_start": starts if self.options.prefix_start == AUTO else None,
        }
        ladders = {field: ladder for field, ladder in ladders.items() if ladder is not None}
        if not ladders:
            return initial
        per_trial = 2 * (self.blocks - first) / self.blocks  # observe, then evaluate, from `first` at worst
        cost = per_trial * MAX_TRIALS + 3 * first / self.blocks
        sensitive = initial.sensitive_layer
        counts, largest = self._massive_counts(sensitive), self._largest_token(range(sensitive, sensitive + 1))
        hardest = sorted(range(self.samples), key=lambda image: (-counts[image], -largest[image]))
        self.inputs, self.reference = self._subset(TRIAL_PASSES / cost, hardest)
        self.trial_samples = _count(self.inputs)
        self.passes["trials"] = cost * self.trial_samples / self.samples
        self.bar.total = (self.bar.total or 0) + MAX_TRIALS
        self.bar.refresh()
        best = initial
        improved = True
        while improved and len(self.trials) < MAX_TRIALS:
            improved = False
            for field, ladder in ladders.items():
                better = self._line_search(best, field, ladder)
                improved |= better != best
                best = better
        self.bar.total = self.bar.n
        self.bar.refresh()
        return best

    def _line_search(self, best: RegCacheSettings, field: str, ladder: tuple[int, ...] | list[int]) -> RegCacheSettings:
        """From `best`, step along `ladder` in the direction that improves, while it improves."""
        origin = list(ladder).index(getattr(best, field)) if getattr(best, field) in ladder else 0
        best_score = self._score(best)
        for direction in (1, -1):
            index, moved = origin, False
            while 0 <= index + direction < len(ladder) and (
                    len(self.trials) < MAX_TRIALS or dataclasses.replace(best, **{field: ladder[index + direction]}) in self.trials):
                candidate = dataclasses.replace(best, **{field: ladder[index + direction]})
                score = self._score(candidate)
                if score >= best_score:
                    break
                best, best_score, index, moved = candidate, score, index + direction, True
            if moved:
                break
        return best

    @torch.no_grad()
    def _score(self, settings: RegCacheSettings) -> float:
        """Cosine distance to full precision of the embedding, with `settings` installed and
        quantized as the recipe says; only the blocks the settings change are run."""
        if settings in self.trials:
            return self.trials[settings]
        start = min(settings.prefix_start, settings.sensitive_layer)
        observed, evaluated, affected = self._cache(start)
        with install(self.adapter, settings, self.registers), self._quantized(affected) as quantizer:
            with quantizer.calibrating(self.model):
                for batch, hidden in zip(self.inputs, observed):
                    self.adapter.run_from(start, hidden, batch)
            quantizer.freeze(self.model)
            embeddings = [self.adapter.run_from(start, hidden, batch) for batch, hidden in zip(self.inputs, evaluated)]
        score = _cosine_distance(self.reference, torch.cat(embeddings))
        self.trials[settings] = score
        self.bar.update()
        self.bar.set_postfix(best=f"{min(self.trials.values()):.2e}")
        return score

    @torch.no_grad()
    def _cache(self, start: int) -> tuple[list[torch.Tensor], list[torch.Tensor], list[str]]:
        """For the trial images, the residual stream entering block `start` in full precision (what
        the observers see) and through the quantized blocks before it (what is evaluated), and
        the targets from there on; computed once per block."""
        if start not in self.caches:
            names = self.adapter.block_names()[:start]
            before = [name for name in self.targets
                      if name in self.profile.before_blocks or any(name.startswith(block + ".") for block in names)]
            observed = [self.adapter.hidden_before(start, batch) for batch in self.inputs]
            evaluated = observed
            if before:
                with self._quantized(before) as quantizer:
                    with quantizer.calibrating(self.model):
                        for batch in self.inputs:
                            self.adapter.hidden_before(start, batch)
                    quantizer.freeze(self.model)
                    evaluated = [self.adapter.hidden_before(start, batch) for batch in self.inputs]
            self.caches[start] = (observed, evaluated, [name for name in self.targets if name not in before])
        return self.caches[start]

    # --- helpers --------------------------------------------------------------------------
    @contextlib.contextmanager
    def _quantized(self, names: list[str]) -> Iterator[Quantizer]:
        """A quantizer of the recipe's backend and settings for exactly `names`, prepared on copies
        of those Linears; the originals are put back on exit."""
        originals = {name: self.model.get_submodule(name) for name in names}
        try:
            for name, module in originals.items():
                self.model.set_submodule(name, copy.deepcopy(module))
            config = self.context.recipe.quantization.model_copy(
                update={"targets": ["re:(?:" + "|".join(re.escape(name) for name in names) + ")$"], "ignore": []}
            )
            quantizer = self.quantizer_type(config)
            quantizer.prepare(self.model)
            yield quantizer
        finally:
            for name, module in originals.items():
                self.model.set_submodule(name, module)

    def _subset(self, fraction: float, hardest_first: list[int]) -> tuple[list[Batch], torch.Tensor]:
        """`fraction` of the calibration images (at least MIN_SEARCH_SAMPLES) and their
        full-precision embeddings. Static activation scales are set by the most extreme images
        of the whole set, so half the subset is the first of `hardest_first` and the other half
        the first of the rest, as they come."""
        wanted = min(self.samples, max(MIN_SEARCH_SAMPLES, math.floor(fraction * self.samples)))
        hardest = hardest_first[: wanted // 2]
        chosen = sorted(hardest) + [image for image in range(self.samples) if image not in set(hardest)][: wanted - len(hardest)]
        return self._images(chosen), self.profile.embeddings[chosen]

    def _images(self, images: list[int]) -> list[Batch]:
        """These calibration images (indices in calibration order), in batches of the calibration
        batch size."""
        batches = self.context.calibration_batches
        where = [(batch, row) for batch, inputs in enumerate(batches) for row in range(_batch_size(inputs))]
        size = _batch_size(batches[0])
        chunks = [[where[image] for image in images[start : start + size]] for start in range(0, len(images), size)]
        return [{key: torch.cat([batches[batch][key][row : row + 1] for batch, row in chunk]) for key in batches[0]}
                for chunk in chunks]

    @torch.no_grad()
    def sequence_maxima(self, sensitive: int) -> dict[str, float]:
        """With what is installed now, on the trial images: the largest token l_inf norm entering
        block `sensitive` (after any deletion) and entering its fc2."""
        inputs = self.inputs or self._subset(0, [])[0]
        maxima = {"block_input": 0.0, "fc2_input": 0.0}

        def record(key: str):
            def hook(_module: nn.Module, args: tuple) -> None:
                maxima[key] = max(maxima[key], args[0].abs().max().item())
            return hook

        handles = [self.adapter.blocks()[sensitive].register_forward_pre_hook(record("block_input")),
                   self.adapter.fc2(sensitive).register_forward_pre_hook(record("fc2_input"))]
        try:
            for batch in inputs:
                self.adapter.embed(batch)
        finally:
            for handle in handles:
                handle.remove()
        return maxima


def _batch_size(batch: Batch) -> int:
    return len(next(iter(batch.values())))


def _count(batches: list[Batch]) -> int:
    return sum(_batch_size(batch) for batch in batches)


def _nearest(ladder: tuple[int, ...], value: int) -> int:
    return min(ladder, key=lambda step: (abs(step - value), step))


def _cosine_distance(reference: torch.Tensor, embeddings: torch.Tensor) -> float:
    return 1.0 - torch.nn.functional.cosine_similarity(reference.double(), embeddings.double(), dim=-1).mean().item()
