"""The real-text sentiment task (models/training/snippets.py): clearly polar sentences only,
labelled by sign, split by document, and the committed files are what the module writes."""

from models.training.snippets import DATA, THRESHOLD, build, write


def test_only_clearly_polar_sentences_labelled_by_the_sign_of_their_rating():
    files = build()
    rows = files["train"] + files["validation"] + files["test"]
    assert rows and all(abs(r["rating"]) >= THRESHOLD for r in rows)
    assert all(r["label"] == ("positive" if r["rating"] > 0 else "negative") for r in rows)


def test_no_document_has_sentences_on_two_sides():
    files = build()
    for corpus in ("amazon", "nyt"):
        docs = {split: {r["id"].split("_")[0] for r in files[split] if r["corpus"] == corpus}
                for split in ("train", "validation", "test")}
        assert not docs["train"] & docs["validation"] and not docs["train"] & docs["test"]
        assert not docs["validation"] & docs["test"]
        assert files[f"test-{corpus}"] == [r for r in files["test"] if r["corpus"] == corpus]


def test_the_committed_files_are_what_the_module_writes(tmp_path):
    for name, path in write(build(), tmp_path).items():
        assert path.read_bytes() == (DATA / f"{name}.jsonl").read_bytes(), name
    assert (DATA / "LICENSE.txt").read_text().startswith("The MIT License")
