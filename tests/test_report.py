from whisper_lora.report import format_table


def test_table_formats_rates_as_percentages():
    table = format_table(["model", "CER"], [["base", 0.5], ["tuned", 0.0625]])
    lines = table.splitlines()
    assert lines[0].startswith("| model") and "50.00%" in lines[2] and "6.25%" in lines[3]
    assert len({len(line) for line in lines}) == 1
