"""Result names (api/core/results.py): every name the worker makes reads back as its kind and modality; a name
outside the grammar is refused rather than guessed."""

import pytest

from api.core import results


@pytest.mark.parametrize("modality", ["t1", "flair", "t1ce"])
def test_every_made_name_reads_back_as_its_kind(modality):
    made = {results.name(kind, modality): kind for kind in results.SUFFIXES}
    for name, kind in made.items():
        assert results.kind_of(name) == results.ResultKind(kind, modality=modality), name
    assert len(made) == len(results.SUFFIXES)  # a distinct name per kind


def test_the_jobs_own_files_and_the_overlays():
    assert results.kind_of(results.RECORD).kind == "record" and results.kind_of(results.PREVIEW).kind == "preview"
    assert results.kind_of(results.REPORT) == results.ResultKind("report")
    for o in results.OVERLAYS:
        assert results.kind_of(results.overlay(o)) == results.ResultKind("overlay", overlay=o)
    with pytest.raises(ValueError, match="not a result name"):
        results.kind_of("notes.txt")
