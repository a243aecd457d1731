"""Evaluation prompt sets (magnet_jax.evaluation.captions): MusicCaps' CSV as distributed, jsonl and txt files."""

import json

import pytest

from magnet_jax.evaluation.captions import Caption, CaptionError, read_captions

MUSICCAPS = (
    "ytid,start_s,end_s,audioset_positive_labels,aspect_list,caption,author_id,is_balanced_subset,is_audioset_eval\n"
    '-0Gj8-vB1q4,30,40,"/m/0140xf,/m/02cjck","[\'low quality\', \'sustained strings melody\']","The low quality '
    'recording features a ""sustained"" strings melody,\nplayed softly.",4,False,True\n'
    "0bP2MH3MhWQ,30,40,/m/04rlf,\"['jazz']\",A jazz trio with brushed drums.,7,True,False\n"
)


def test_musiccaps_csv_as_distributed(tmp_path):
    path = tmp_path / "musiccaps-public.csv"
    path.write_text(MUSICCAPS, encoding="utf-8")
    assert read_captions(path) == [
        Caption(
            "-0Gj8-vB1q4",
            "yt-0Gj8-vB1q4",  # YouTube ids may start with '-', which no sample file name may
            'The low quality recording features a "sustained" strings melody,\nplayed softly.',
        ),
        Caption("0bP2MH3MhWQ", "0bP2MH3MhWQ", "A jazz trio with brushed drums."),
    ]


def test_jsonl_and_txt_are_named_as_the_generation_job_names_them(tmp_path):
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text(
        json.dumps({"text": "rock anthem", "seed": 3}) + "\n\n" + json.dumps({"id": "jazz", "text": "trio"})
    )
    assert read_captions(jsonl) == [Caption("line00001", "line00001", "rock anthem"), Caption("jazz", "jazz", "trio")]
    txt = tmp_path / "p.txt"
    txt.write_text("# comment\nrock anthem\n\n  lo-fi beat \n")
    assert [(c.id, c.text) for c in read_captions(txt)] == [("line00002", "rock anthem"), ("line00004", "lo-fi beat")]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("a.csv", "ytid,description\nx,y\n", "expected a header with ytid and caption"),
        ("a.csv", "ytid,caption\nx,one\nx,two\n", r"a.csv:3: id 'x' repeats line 2"),
        ("a.csv", "ytid,caption\nx,\n", r"a.csv:2: empty caption"),
        ("a.csv", "ytid,caption\n", "no captions"),
        ("a.jsonl", '{"text": "ok"}\n{broken\n', r"a.jsonl:2: not valid JSON"),
        ("a.jsonl", '{"caption": "no text key"}\n', r"a.jsonl:1: expected an object with a string 'text'"),
        ("a.jsonl", '{"id": "a/b", "text": "x"}\n', r"id 'a/b' cannot name a file"),
        ("a.tsv", "x\n", "expected a .csv, .jsonl or .txt file"),
    ],
)
def test_malformed_sets_are_one_line_errors(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(CaptionError, match=message) as info:
        read_captions(tmp_path / name)
    assert "\n" not in str(info.value)
