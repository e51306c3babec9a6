"""The contract between the data pipelines and the training loop (data/sample_set.py)."""

from indexed_corpus import data_config

from megatron_mellama.data.datasets import build_datasets
from megatron_mellama.data.sample_set import SampleSet


def test_training_samples_keep_the_contract_across_a_resume():
    cfg = data_config(["unused"], seq_length=32)
    cfg.data.data_path, cfg.data.mock_data, cfg.model.vocab_size = None, True, 1000
    train = build_datasets(cfg).train
    assert isinstance(train, SampleSet)
    resumed, changes = train.continued(train.state(200), 200)
    assert isinstance(resumed, SampleSet) and changes == []
    assert resumed.named(resumed.consumed_per_domain(300)) == {"mock": 300}
