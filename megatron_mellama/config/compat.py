"""Megatron-LM flags that describe what this framework always does for LLaMA2.

They are accepted so that a Megatron-LM LLaMA2 launch script runs unchanged. A flag whose value
asks for a different architecture is refused rather than silently ignored.
"""

import argparse

from .errors import ConfigError

# store_true flags that LLaMA2 scripts pass; this framework always behaves that way.
ALWAYS_ON = (
    "swiglu", "disable_bias_linear", "untie_embeddings_and_output_weights", "use_rotary_position_embeddings",
    "no_position_embedding", "use_flash_attn", "no_masked_softmax_fusion", "attention_softmax_in_fp32",
    "use_mcore_models", "no_bias_swiglu_fusion", "no_rope_fusion", "exit_on_missing_checkpoint",
)

# flags with a value: the one value LLaMA2 allows, and why.
FIXED_VALUES = {
    "normalization": ("RMSNorm", "LLaMA2 normalises with RMSNorm"),
    "attention_dropout": (0.0, "LLaMA2 is trained without dropout"),
    "hidden_dropout": (0.0, "LLaMA2 is trained without dropout"),
}

# flags whose value is a choice of implementation, not of architecture: any listed value is fine.
IGNORED_CHOICES = {"transformer_impl": ("local", "transformer_engine")}


def add_compat_flags(group) -> None:
    for name in ALWAYS_ON:
        group.add_argument("--" + name.replace("_", "-"), dest="compat." + name, action="store_true",
                           default=argparse.SUPPRESS, help="accepted for Megatron-LM scripts; always on here")
    for name, (value, why) in FIXED_VALUES.items():
        group.add_argument("--" + name.replace("_", "-"), dest="compat." + name, default=argparse.SUPPRESS,
                           type=type(value), metavar=str(value), help=f"only {value}: {why}")
    for name, choices in IGNORED_CHOICES.items():
        group.add_argument("--" + name.replace("_", "-"), dest="compat." + name, default=argparse.SUPPRESS,
                           choices=choices, help="accepted for Megatron-LM scripts")


def check_compat_value(name: str, value) -> None:
    """Refuse a value that asks for another architecture; the same check for a flag and a YAML key."""
    flag = "--" + name.replace("_", "-")
    if name in ALWAYS_ON:
        # on the command line these are store_true (always True); a YAML file may say false
        if value is not True:
            shown = str(value).lower() if isinstance(value, bool) else repr(value)
            raise ConfigError(f"{flag} {shown}: only true is supported (LLaMA2 always works this way; "
                              "omit the key or set it to true)")
    elif name in FIXED_VALUES:
        wanted, why = FIXED_VALUES[name]
        try:
            ok = not isinstance(value, (bool, list, dict)) and type(wanted)(value) == wanted
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ConfigError(f"{flag} {value}: only {wanted} is supported ({why})")
    elif name in IGNORED_CHOICES and value not in IGNORED_CHOICES[name]:
        raise ConfigError(f"{flag} {value}: expected one of {', '.join(IGNORED_CHOICES[name])}")


def compat_names() -> set:
    return set(ALWAYS_ON) | set(FIXED_VALUES) | set(IGNORED_CHOICES)

