"""Model presets: the published LLaMA2 shapes (Touvron et al. 2023, and Meta's params.json)."""

_LLAMA2 = dict(norm_epsilon=1e-5, rotary_base=10000.0, vocab_size=32000, max_position_embeddings=4096,
               seq_length=4096)

PRESETS = {
    "llama2-7b": dict(_LLAMA2, num_layers=32, hidden_size=4096, num_attention_heads=32, ffn_hidden_size=11008),
    "llama2-13b": dict(_LLAMA2, num_layers=40, hidden_size=5120, num_attention_heads=40, ffn_hidden_size=13824),
    "llama2-70b": dict(_LLAMA2, num_layers=80, hidden_size=8192, num_attention_heads=64, ffn_hidden_size=28672,
                       group_query_attention=True, num_query_groups=8),
    # Small enough for a CPU test in seconds, GQA so that every code path is exercised.
    "tiny": dict(num_layers=4, hidden_size=64, num_attention_heads=4, group_query_attention=True,
                 num_query_groups=2, ffn_hidden_size=176, norm_epsilon=1e-5, rotary_base=10000.0,
                 vocab_size=32000, max_position_embeddings=256, seq_length=128),
}
