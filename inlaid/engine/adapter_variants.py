"""The PEFT LoRA variants the engine refuses: what they change is not computed by a plain
LoRA on the shared base, so each is rejected naming it rather than served wrong."""

from __future__ import annotations

from typing import Any

from inlaid.engine.adapter_config import AdapterError


# PEFT LoRA variants whose computation the engine does not implement: each field must be
# absent, null, false or empty. Served as a plain LoRA they answer wrongly without a word (an
# outside probe: PEFT's layer_replication adapter answered as the base model); the newer
# variants are refused until their inference is checked against PEFT. (VeLoRA is not here:
# it changes training only; its inference is a plain LoRA's.)
UNSUPPORTED_VARIANTS = {
    "layer_replication": "layer replication (layer_replication)",
    "lora_bias": "a trained bias on lora_B (lora_bias=true)",
    "use_qalora": "QA-LoRA (use_qalora=true)",
    "target_parameters": "LoRA on parameters (target_parameters)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "arrow_config": "Arrow routing (arrow_config)",
    "use_bdlora": "BD-LoRA (use_bdlora)",
    "kasa_config": "KaSA (kasa_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
}

# PEFT's values of init_lora_weights, by the base the adapter was trained on. PiSSA, CorDA,
# OLoRA and LoRA-GA take the initial B @ A out of the base weights before training (PEFT redoes
# it when it loads PiSSA, CorDA and OLoRA; LoRA-GA's it cannot redo): on the unchanged shared
# base such an adapter answers wrongly (a PiSSA adapter counted its principal part twice: an
# outside probe). PEFT converts one to a plain LoRA on save, given
# path_initial_model_for_weight_conversion. LoftQ trains on its own quantization of the base.
# Any other string PEFT cannot load.
PLAIN_INITS = ("gaussian", "eva", "orthogonal", "mica")
RESIDUAL_BASE_INITS = ("pissa", "corda", "olora", "lora_ga")


def check_variant(name: str, config: dict[str, Any]) -> None:
    """AdapterError naming the first variant the adapter_config.json asks for that the engine
    does not compute (DoRA, modules_to_save, an unknown bias, `UNSUPPORTED_VARIANTS`, a
    residual-base or LoftQ init, activated LoRA)."""
    def reject(feature: str) -> None:
        raise AdapterError(f"adapter {name!r}: {feature} is not supported")

    if config.get("use_dora"):
        reject("DoRA (use_dora=true)")
    if config.get("modules_to_save"):
        reject(f"modules_to_save {config['modules_to_save']!r:.80}")
    # bias "all" / "lora_only" train the adapted layers' biases: a base without them (Llama)
    # has none to train, and PEFT saves none; one saved is refused as a tensor (adapter_weights)
    if config.get("bias", "none") not in ("none", "all", "lora_only"):
        reject(f"bias={config['bias']!r:.80}")
    for field, feature in UNSUPPORTED_VARIANTS.items():
        if config.get(field) not in (None, False, [], {}, ""):
            reject(feature)
    _check_init(name, config.get("init_lora_weights"), config.get("loftq_config"))
    if config.get("alora_invocation_tokens"):
        # aLoRA applies the adapter only from its invocation tokens on; served as a LoRA on
        # every token, its outputs were neither PEFT's nor the base's (an outside probe)
        reject("activated LoRA (alora_invocation_tokens)")


def _check_init(name: str, init: Any, loftq_config: Any) -> None:
    where = f"adapter {name!r}: init_lora_weights={init!r:.40} is not supported"
    if (isinstance(init, str) and init.lower() == "loftq") or loftq_config:
        raise AdapterError(f"adapter {name!r}: a LoftQ adapter (init_lora_weights / loftq_config) is not supported: "
                           "it was trained on LoftQ's own quantization of the base, not on the shared base")
    if init is None or isinstance(init, bool) or (isinstance(init, str) and init.lower() in PLAIN_INITS):
        return
    if isinstance(init, str) and init.lower().startswith(RESIDUAL_BASE_INITS):
        raise AdapterError(f"{where}: it was trained on the base minus its initial B @ A, so on the shared base it "
                           "answers wrongly; convert it to a plain LoRA with PEFT (save_pretrained(..., "
                           "path_initial_model_for_weight_conversion=<its untrained adapter>)) and serve that")
    raise AdapterError(f"{where} (PEFT knows true, false, {', '.join(PLAIN_INITS)}, loftq and the residual-base "
                       f"{', '.join(RESIDUAL_BASE_INITS)})")
