"""`spectr bench forward` runs end to end on a tiny model and reports every backend."""

from spectr.bench import forward
from tests.models.test_loading import save_tiny_model


def test_bench_forward_on_a_tiny_model(tmp_path):
    folder = save_tiny_model(tmp_path / "tiny")
    results = forward.run(str(folder), precisions=("fp32", "bf16", "int4"), context=12, repeats=2)
    names = [result.backend for result in results]
    assert names[:3] == ["spectr fp32", "spectr bf16", "spectr int4"]
    assert "transformers eager bf16" in names
    for result in results:
        assert set(result.milliseconds) == {1, 4, 8, 16, -1, -4, -8, -16} and min(result.milliseconds.values()) > 0
    assert results[1].deviation["top1_agreement"] > 0.5
    table = forward.render(results, 12, forward.NEW_TOKEN_COUNTS, 2, load=1.5)
    assert "| spectr int4 |" in table and "exact with respect to" in table and "16 tok ÷ own 1 tok" in table
    assert "in 1.50 s" in table
