import warnings

import datasets
import pytest

from hf_ceag import GROUP_ID_COLUMN, CEAGConfig, GroupIndex


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("target_sparsity", 1.0, "target_sparsity=1.0 is outside"),
        ("target_sparsity", -0.1, "target_sparsity=-0.1"),
        ("tolerance", -0.01, "tolerance=-0.01 is negative"),
        ("constraint_margin", -0.01, "constraint_margin=-0.01 is negative"),
        ("dual_lr", 0.0, "dual_lr=0.0 must be > 0"),
        ("buffer_size", -1, "buffer_size=-1 must be >= 0"),
        ("mitigation", "fair", "mitigation='fair'"),
        ("pruning_scope", "blockwise", "pruning_scope='blockwise'"),
        ("pruning_frequency", 0, "pruning_frequency=0"),
        ("group_columns", [], "group_columns"),
        ("dual_optimizer", "adam", "dual_optimizer='adam' is not one of"),
        ("nupi_kp", -1.0, "nupi_kp=-1.0 is negative"),
        ("nupi_ki", -0.5, "nupi_ki=-0.5 is negative"),
        ("nupi_ema_nu", 1.0, "nupi_ema_nu=1.0 is outside"),
        ("nupi_kp", 2.0, "nupi_kp=2.0 set with dual_optimizer='sgd'.*add dual_optimizer='nupi'"),
    ],
)
def test_config_rejects_bad_values_with_field_and_fix(tmp_path, field, value, message):
    with pytest.raises(ValueError, match=message):
        CEAGConfig(output_dir=str(tmp_path), report_to="none", **{field: value})


def test_config_defaults_follow_the_paper(tmp_path):
    config = CEAGConfig(output_dir=str(tmp_path), report_to="none", num_train_epochs=10)
    assert (config.mitigation, config.tolerance, config.buffer_size) == ("ceag", 0.01, 40)
    assert (
        config.pruning_scope == "layerwise" and config.keep_first_last_dense and not config.mitigate_during_pruning
    )
    assert config.resolved_pruning_end_epoch == 5.0


def test_dual_optimizer_flags_reach_the_config_and_sgd_stays_the_default(tmp_path):
    from transformers import HfArgumentParser

    common = ["--output_dir", str(tmp_path), "--report_to", "none"]
    (config,) = HfArgumentParser(CEAGConfig).parse_args_into_dataclasses(args=common)
    assert config.dual_optimizer == "sgd"
    args = [*common, "--dual_optimizer", "nupi", "--nupi_kp", "4", "--nupi_ema_nu", "0.5"]
    (config,) = HfArgumentParser(CEAGConfig).parse_args_into_dataclasses(args=args)
    assert (config.dual_optimizer, config.nupi_kp, config.nupi_ki, config.nupi_ema_nu) == ("nupi", 4.0, 1.0, 0.5)
    with pytest.raises(ValueError, match="nupi_kp=0 and nupi_ki=0"):
        CEAGConfig(output_dir=str(tmp_path), report_to="none", dual_optimizer="nupi", nupi_kp=0.0, nupi_ki=0.0)


def frame():
    features = datasets.Features(
        {
            "race": datasets.Value("string"),
            "sex": datasets.ClassLabel(names=["female", "male"]),
            "x": datasets.Value("int64"),
        }
    )
    return datasets.Dataset.from_dict(
        {"race": ["b", "a", "b", "c", "a"], "sex": [0, 1, 1, 0, 0], "x": [1, 2, 3, 4, 5]}, features=features
    )


def test_group_index_strings_classlabels_and_intersections():
    ds = frame()
    single = GroupIndex.from_dataset(ds, ["race"])
    assert single.names == ["a", "b", "c"] and single.train_counts == [2, 2, 1]
    both = GroupIndex.from_dataset(ds, ["race", "sex"])
    assert both.names == ["a & female", "a & male", "b & female", "b & male", "c & female"]
    encoded = both.encode(ds, "train")
    ids = encoded[GROUP_ID_COLUMN]
    assert [both.names[i] for i in ids] == ["b & female", "a & male", "b & male", "c & female", "a & female"]
    assert GroupIndex.from_dict(both.to_dict()).names == both.names


def test_unseen_eval_group_warns_and_gets_an_unconstrained_id():
    index = GroupIndex.from_dataset(frame(), ["race"])
    other = datasets.Dataset.from_dict({"race": ["a", "z"], "x": [0, 0]})
    with pytest.warns(UserWarning, match=r"\['z'\].*unconstrained"):
        encoded = index.encode(other, "test")
    assert list(encoded[GROUP_ID_COLUMN]) == [0, 3] and index.num_groups == 3


def test_missing_or_null_group_column_is_a_clear_error():
    with pytest.raises(ValueError, match=r"'rase' is not in the train dataset.*'race'"):
        GroupIndex.from_dataset(frame(), ["rase"])
    nulls = datasets.Dataset.from_dict({"race": ["a", None, "b"]})
    with pytest.raises(ValueError, match="1 null or NaN value"):
        GroupIndex.from_dataset(nulls, ["race"])


def test_encode_keeps_a_set_transform():
    ds = frame()
    ds.set_transform(lambda batch: {**batch, "x": [v * 10 for v in batch["x"]]})
    encoded = GroupIndex.from_dataset(ds, ["race"]).encode(ds, "train")
    row = encoded[0]
    assert row["x"] == 10 and row[GROUP_ID_COLUMN] == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GroupIndex.from_dataset(ds, ["race"]).encode(ds, "train")


@pytest.mark.parametrize(
    "eval_feature",
    [datasets.Value("string"), datasets.Value("int64")],
    ids=["names as strings", "ids as integers"],
)
def test_eval_groups_of_another_type_are_matched_by_name(eval_feature):
    """Training groups a ClassLabel named '0'..'2'; the test split stores the same groups as strings (or plain
    integers): every test row joins its training group, none becomes an unconstrained group of its own."""
    names = ["0", "1", "2"]
    train = datasets.Dataset.from_dict(
        {"g": [0, 1, 2, 2]}, features=datasets.Features({"g": datasets.ClassLabel(names=names)})
    )
    values = ["2", "0", "1"] if eval_feature.dtype == "string" else [2, 0, 1]
    test = datasets.Dataset.from_dict({"g": values}, features=datasets.Features({"g": eval_feature}))
    index = GroupIndex.from_dataset(train, ["g"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "appear in the test data but not in the training data"
        encoded = index.encode(test, "test")
    assert encoded.with_format(None)[GROUP_ID_COLUMN] == [2, 0, 1]
    assert index.names == names and index.num_groups == 3
    other = datasets.Dataset.from_dict({"g": ["3"]})  # a group training never saw is still new
    with pytest.warns(UserWarning, match=r"\['3'\] appear in the test data"):
        assert index.encode(other, "test").with_format(None)[GROUP_ID_COLUMN] == [3]
