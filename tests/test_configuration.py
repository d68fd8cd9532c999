import pytest

from tarflow_hf import TarFlowConfig


def test_derived_sizes():
    config = TarFlowConfig(image_size=32, num_channels=3, patch_size=4, hidden_size=128, head_dim=32)
    assert config.num_patches == (32 // 4) ** 2
    assert config.patch_dim == 3 * 4 * 4
    assert config.num_heads == 4


def test_class_names_default_and_inverse_table():
    config = TarFlowConfig(num_classes=3)
    assert config.id2label == {0: "class_0", 1: "class_1", 2: "class_2"}
    assert config.label2id == {"class_0": 0, "class_1": 1, "class_2": 2}
    named = TarFlowConfig(num_classes=2, id2label={0: "cat", 1: "dog"})
    assert named.label2id == {"cat": 0, "dog": 1}
    assert TarFlowConfig(num_classes=0).id2label == {}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"image_size": 30, "patch_size": 4}, "image_size=30 is not divisible by patch_size=4"),
        ({"hidden_size": 100, "head_dim": 64}, "hidden_size=100 is not divisible by head_dim=64"),
        ({"num_blocks": 0}, "num_blocks must be a positive integer, got 0"),
        ({"layers_per_block": -2}, "layers_per_block must be a positive integer, got -2"),
        ({"patch_size": -1}, "patch_size must be a positive integer, got -1"),
        ({"num_classes": -1}, "num_classes must be 0 (unconditional) or positive, got -1"),
        ({"noise_std": -0.1}, "noise_std must be >= 0, got -0.1"),
        ({"num_classes": 3, "id2label": {0: "a"}}, "id2label has 1 entries but num_classes=3"),
    ],
)
def test_invalid_combinations_name_the_field(overrides, message):
    with pytest.raises(ValueError) as error:
        TarFlowConfig(**overrides)
    assert message in str(error.value)


def test_save_and_load_round_trip(tmp_path):
    config = TarFlowConfig(image_size=16, patch_size=2, num_classes=2, id2label={0: "cat", 1: "dog"}, noise_std=0.07)
    config.save_pretrained(tmp_path)
    loaded = TarFlowConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    assert loaded.id2label == {0: "cat", 1: "dog"}
    assert isinstance(loaded.noise_std, float)


def test_num_labels_is_num_classes():
    """transformers' `num_labels` (the size of `id2label`) is TarFlow's number of classes, both ways."""
    config = TarFlowConfig(num_labels=5)
    assert config.num_classes == config.num_labels == len(config.id2label) == len(config.label2id) == 5
    config.num_labels = 3
    assert config.num_classes == 3 and config.id2label == {0: "class_0", 1: "class_1", 2: "class_2"}
    assert TarFlowConfig(num_classes=2, num_labels=2).num_classes == 2
    assert TarFlowConfig(id2label={0: "cat", 1: "dog"}).num_classes == 2  # names given: one class each
    with pytest.raises(ValueError, match="num_labels=5 and num_classes=3 disagree"):
        TarFlowConfig(num_classes=3, num_labels=5)
    with pytest.raises(ValueError, match=r"num_labels \(num_classes\) must be an integer >= 0, got -1"):
        TarFlowConfig(num_labels=-1)


def test_label2id_is_kept_as_given_when_it_inverts_id2label():
    """transformers keeps `label2id` as given (JSON may hold its ids as strings); one that does not invert `id2label`
    (a config whose `id2label` was changed without it saves a stale one) is derived from `id2label` again."""
    config = TarFlowConfig(id2label={0: "cat", 1: "dog"}, label2id={"cat": "0", "dog": "1"})
    assert config.label2id == {"cat": "0", "dog": "1"}
    for stale in ({"cat": 1, "dog": 0}, {"cat": 0}, {"class_0": 0, "class_1": 1}):
        assert TarFlowConfig(id2label={0: "cat", 1: "dog"}, label2id=stale).label2id == {"cat": 0, "dog": 1}
