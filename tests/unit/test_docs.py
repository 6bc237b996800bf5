from cluster.docs import END, README, START, config_reference


def test_readme_config_reference_matches_the_schema():
    text = README.read_text()
    section = text.split(START, 1)[1].split(END, 1)[0].strip()
    assert section == config_reference().strip(), "run: python -m cluster.docs --write"


def test_reference_lists_nested_keys():
    ref = config_reference()
    for key in ("`data.dedup.partitions`", "`data.sft.overlong`", "`tokenizer.vocab_size`"):
        assert key in ref
