"""RegCache (Kim et al., "Activation Quantization of Vision Encoders Needs Prefixing Registers",
arXiv 2510.04547): cached key/value registers in front of the middle-to-late attentions, and
deletion of the few massive tokens at the sensitive block's input, so that per-tensor activation
scales stop being set by sink tokens. README.md in this folder describes the algorithm as
implemented, its cost and its known limits.

One module per stage: options (the recipe's fields), profile (the reference pass), sensitivity
(step a), registers (steps b, c), search (the auto fields), install (steps d, e on a model);
trials holds the trial quantizers the scan and the search share.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import torch
from tqdm.auto import tqdm

from quantsink.errors import CheckpointError, UserError
from quantsink.methods.base import Method, MethodContext
from quantsink.methods.regcache.install import install, sequence_maxima
from quantsink.methods.regcache.options import AUTO, SEARCHABLE, RegCacheOptions, RegCacheSettings
from quantsink.methods.regcache.profile import MIN_SEARCH_SAMPLES, CalibrationImages, count, reference_pass
from quantsink.methods.regcache.registers import Registers, average_registers, candidate_blocks, candidates, massive_candidates
from quantsink.methods.regcache.search import JointSearch, start_range
from quantsink.methods.regcache.sensitivity import scan
from quantsink.methods.regcache.trials import CRITERION, TrialQuantizers
from quantsink.models.base import Adapter
from quantsink.models.capabilities import EditableEncoder
from quantsink.registry import METHODS

__all__ = ["RegCache", "RegCacheOptions", "RegCacheSettings", "Registers", "install"]

log = logging.getLogger(__name__)


@METHODS.register("regcache")
class RegCache(Method):
    name = "regcache"
    writes_weights = True  # its trials quantize the model in place
    options_model = RegCacheOptions
    requires = (EditableEncoder,)

    def __init__(self, options: RegCacheOptions):
        super().__init__(options)
        self.settings: RegCacheSettings | None = None
        self.registers: Registers | None = None
        self.report: dict[str, Any] = {}

    def apply(self, context: MethodContext) -> dict[str, Any]:
        """Steps a-c and the search of the `auto` fields on the calibration set, then steps d-e
        installed; the report holds what was measured and chosen, and the measured cost."""
        adapter, options = context.adapter, self.options
        started = time.perf_counter()
        trials = TrialQuantizers(context)
        for field in ("sensitive_layer", "prefix_start"):
            value = getattr(options, field)
            if value != AUTO and value >= adapter.num_blocks:
                raise UserError(f"regcache.{field}: {value} is not a block of this model (it has {adapter.num_blocks})")
        prefix_blocks = adapter.register_prefix_blocks if options.prefix_blocks == AUTO else options.prefix_blocks
        if prefix_blocks == "sensitive_only" and options.prefix_start != AUTO:
            raise UserError(f"regcache.prefix_start: {options.prefix_start} cannot apply, the prefix goes only at the sensitive "
                            f"block ({adapter.family}'s default); set prefix_blocks: to_last, or drop prefix_start")
        pass_started = time.perf_counter()
        profile = reference_pass(adapter, context.calibration_batches, trials.targets, context.recipe.execution)
        pass_seconds = time.perf_counter() - pass_started
        images = CalibrationImages(context.calibration_batches, profile.embeddings)
        searched = [field for field in SEARCHABLE if getattr(options, field) == AUTO]
        # with nothing to choose there is nothing to validate: every image builds
        build, validation = images.split(options.validation_fraction) if searched else (list(range(images.count)), [])
        passes = {"reference": 1.0}  # modelled cost of each stage, in full passes
        with tqdm(desc="regcache search", unit="trial", disable=not context.progress) as bar:
            sensitivity = scan(adapter, trials, profile, images, build, bar) if options.sensitive_layer == AUTO else None
            if sensitivity is not None:
                passes["sensitivity"] = sensitivity.passes
            sensitive = options.sensitive_layer if sensitivity is None else sensitivity.sensitive_layer()
            starts = start_range(options, sensitive, prefix_blocks)
            chosen = candidates(profile, sensitive, options.candidate_top_k, build)
            self.registers, passes["registers"] = average_registers(adapter, images, chosen, min(starts[0], sensitive))
            massive = int(profile.massive_counts(sensitive)[build].max())
            search = JointSearch(adapter, trials, profile, images, build, validation, self.registers, options, bar)
            if searched:
                self.settings = search.run(sensitive, starts, massive, prefix_blocks)
                passes["trials"] = search.passes()
            else:
                self.settings = RegCacheSettings(sensitive, starts[0], options.num_registers, options.delete_tokens,
                                                 options.refill, prefix_blocks)
        self.report = {
            **dataclasses.asdict(self.settings),
            "variant": self.settings.variant,
            "searched": searched,
            "criterion": f"1 - {CRITERION} on the validation images",
            "validation": None if not searched else {
                "images": len(validation),
                "build_images": len(build),
                **{variant: {"settings": dataclasses.asdict(trial.settings), **trial.fidelity}
                   for variant, trial in search.best.items()},
                "chosen": search.trials_run[self.settings].fidelity,
            },
            "fc2_input_max": profile.fc2_input_max,
            "sensitivity": None if sensitivity is None else sensitivity.explain(),
            "candidates": {"tokens": len(chosen), "massive": massive_candidates(profile, chosen, sensitive),
                           "blocks": list(candidate_blocks(sensitive))},
            "massive_tokens_per_image": {"max": massive, "mean": profile.massive_counts(sensitive)[build].float().mean().item()},
            "trials": [{**dataclasses.asdict(trial.settings), "damage": trial.damage} for trial in search.trials_run.values()],
        }
        if self.settings.variant == "naive":
            log.warning("regcache: no setting beat naive on the %d validation images, so nothing is installed", len(validation))
        inputs = images.batches_of(validation or build[:MIN_SEARCH_SAMPLES])
        before = sequence_maxima(adapter, self.settings.sensitive_layer, inputs)
        install(adapter, self.settings, self.registers)
        self.report["max_token_linf_at_sensitive_layer"] = {
            "before": before, "after": sequence_maxima(adapter, self.settings.sensitive_layer, inputs)
        }
        seconds = time.perf_counter() - started
        # the unit is a full-precision pass over the calibration set with statistics hooks; the
        # pipeline's calibration pass adds the quantizer's observers, so it is the larger unit
        self.report["cost"] = {
            "seconds": seconds,
            "reference_pass_seconds": pass_seconds,
            "reference_passes": seconds / pass_seconds,
            "planned_passes": sum(passes.values()),
            "stages_in_passes": passes,
            "sensitivity_samples": 0 if sensitivity is None else sensitivity.samples,
            "trial_calibrating_samples": count(search.inputs),
            "quantized_trials": len(search.trials_run),
        }
        validation_text = "nothing searched"
        if searched:
            naive = search.best.get("naive")
            validation_text = (f"validation centred cosine {search.trials_run[self.settings].fidelity[CRITERION]:.4f} "
                               f"(naive {'not searched' if naive is None else f'{naive.fidelity[CRITERION]:.4f}'})")
        log.info(
            "regcache: %s, l_q=%d, prefix from block %d, tau=%d, k~=%d; %s; cost %.1f full-precision passes",
            self.settings.variant, self.settings.sensitive_layer, self.settings.prefix_start, self.settings.num_registers,
            self.settings.delete_tokens, validation_text, self.report["cost"]["reference_passes"],
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
