"""Part 6 of BENCHMARKS.md (`--streaming_section`): the generated rows, the quick measurement run end to end (each
run a fresh process of the benchmark script), and its block written into a copy of BENCHMARKS.md without
disturbing part 5 or the device sections."""

import os

import pytest
import torch

from hf_ceag.benchmarks.document import DEVICE_END, DEVICE_START, device_block
from hf_ceag.benchmarks.generalisation import section_block
from hf_ceag.benchmarks.streaming_memory import (
    BLOCK,
    END,
    START,
    generated_dataset,
    generated_stream,
    growth_per_row,
    merge_streaming_section,
    streaming_block,
)
from scripts import benchmark

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_stream_and_map_style_hold_the_same_rows_made_from_their_index():
    rows = BLOCK + 5  # a second, partial block
    stream, table = generated_stream(rows, 8), generated_dataset(rows, 8)
    streamed = list(stream)
    assert len(streamed) == len(table) == rows
    for i in (0, BLOCK - 1, BLOCK, rows - 1):
        assert torch.equal(streamed[i]["pixel_values"], table[i]["pixel_values"])
        assert int(streamed[i]["label"]) == int(table[i]["label"]) and streamed[i]["group"] == table[i]["group"]
    assert table.cache_files == []  # in memory, as the stream: nothing written
    groups = torch.stack([row["group"] for row in streamed])
    assert 0 < groups.float().mean() < 0.2  # the inverted group is rare but present
    assert not torch.equal(generated_dataset(4, 8, seed=1)[:4]["pixel_values"], table[:4]["pixel_values"])


def test_quick_section_measures_each_run_and_keeps_the_other_blocks(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    with open(os.path.join(REPO_ROOT, "BENCHMARKS.md")) as f:
        committed = f.read()
    original = committed.replace(streaming_block(committed) + "\n\n", "")  # as before part 6 was first written
    path.write_text(original)
    done = benchmark.main(["--streaming_section", "--quick", "--output", str(path)])
    stream, table = done["measured"]
    assert (stream["kind"], stream["rows"], table["kind"], table["rows"]) == ("stream", 4000, "map", 1000)
    for m in done["measured"]:
        assert m["rows_seen"] == m["rows"]  # the dense pass read every generated row, once
        assert m["peak_rss_mib"] >= m["rss_before_mib"] > 0 and m["seconds"] > 0
    text = path.read_text()
    assert streaming_block(text) == done["text"].strip() and text.count(START) == text.count(END) == 1
    assert "| stream (`IterableDataset`) | 4,000 |" in text
    assert "| map-style (`Dataset`, in memory) | 1,000 |" in text
    assert "Reading: stream of 4,000 rows: peak" in text
    assert section_block(text) == section_block(original) != ""  # part 5 kept
    assert device_block(text) == device_block(original) != ""  # the device sections kept
    assert text.index(section_block(text)) < text.index(START) < text.index(DEVICE_START)
    assert text.replace(done["text"].strip() + "\n\n", "") == original  # added before the devices, nothing else
    # a full run rewrites the rest and keeps these three, in this order
    assert benchmark.kept_blocks(text) == [section_block(text), streaming_block(text), device_block(text)]

    merge_streaming_section(str(path), done["text"].replace(START + "\n", START + "\n\nagain\n"))
    again = path.read_text()  # replaced, not added
    assert again.count(START) == 1 and "again" in again and again.endswith(DEVICE_END + "\n")


def test_growth_per_row_is_the_slope_of_peak_minus_before_over_rows():
    runs = [
        {"rows": 1000, "rss_before_mib": 800.0, "peak_rss_mib": 900.0},
        {"rows": 1000 + 2**20, "rss_before_mib": 801.0, "peak_rss_mib": 911.0},
    ]
    assert growth_per_row(runs) == pytest.approx(10.0)  # 10 MiB more over 2**20 more rows: 10 bytes a row
    assert growth_per_row(runs[:1]) is None
