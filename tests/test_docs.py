"""The docstring examples of the core modules run and print what they say."""

import doctest

import pytest

import mergejax.merge
import mergejax.tree


@pytest.mark.parametrize("module", [mergejax.merge, mergejax.tree])
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
