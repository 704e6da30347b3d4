"""Asset cards and the download cache, read natively as fairseq2 reads them."""

from __future__ import annotations

from pathlib import Path

import pytest
from file_server import FileServer

from models import tiny
from models.sonar.cards import CardError, CardNotFoundError, CardStore
from models.sonar.config import decoder_config, encoder_config
from models.sonar.download import DownloadError, cached, entry_dir, fetch


def test_cards_come_from_the_user_folder_and_asset_dirs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    user, extra = tmp_path / "user", tmp_path / "extra"
    (user / "sub").mkdir(parents=True)
    extra.mkdir()
    (user / "sub" / "a.yaml").write_text(
        "name: enc_base\nmodel_family: transformer_encoder\nmodel_arch: basic\n"
        "checkpoint: weights/enc.pt\n---\n"
        "name: enc_child\nbase: enc_base\nmodel_config:\n  _set_:\n    model_dim: 512\n"
    )
    (extra / "b.yml").write_text(
        "name: tok\ntokenizer_ref: enc_child\n---\nname: file_card\ncheckpoint: file:///x/y.pt\n"
    )
    monkeypatch.setenv("FAIRSEQ2_USER_ASSET_DIR", str(user))
    store = CardStore.discover([extra])
    child = store.card("enc_child")
    assert child.uri("checkpoint") == (user / "sub" / "weights" / "enc.pt").as_uri()
    assert encoder_config(child).model_dim == 512
    assert encoder_config(store.card("enc_base")).model_dim == 1024
    assert store.tokenizer_card("tok").name == "enc_child"
    assert store.card("file_card").uri("checkpoint") == "file:///x/y.pt"
    assert "text_sonar_basic_encoder" in store.names()  # shipped with the package
    with pytest.raises(CardNotFoundError):
        store.card("nope")
    (extra / "c.yaml").write_text("name: enc_base\n")
    with pytest.raises(CardError, match="enc_base"):
        CardStore.discover([extra])  # two sources, one name: refused, as fairseq2 does


def test_module_numbers_equal_fairseq2s_configs(
    bundle: tiny.Bundle, fairseq2_reference: None
) -> None:
    from sonar.models.sonar_text import get_sonar_text_decoder_hub, get_sonar_text_encoder_hub
    from sonar.models.sonar_text.factory import SonarTextEncoderFactory

    from models.assets import ensure_asset_dirs

    ensure_asset_dirs([bundle.asset_dir])
    store = CardStore.discover([bundle.asset_dir])
    for enc_name, dec_name in (
        (bundle.encoder, bundle.decoder),
        ("text_sonar_basic_encoder", "text_sonar_basic_decoder"),
    ):
        ref = get_sonar_text_encoder_hub().get_model_config(enc_name)
        mine = encoder_config(store.card(enc_name))
        factory = SonarTextEncoderFactory(ref)  # applies fairseq's max_seq_len offset
        assert (mine.model_dim, mine.num_layers, mine.num_heads, mine.ffn_inner_dim) == (
            ref.model_dim,
            ref.num_encoder_layers,
            ref.num_encoder_attn_heads,
            ref.ffn_inner_dim,
        )
        assert (mine.vocab_size, mine.pad_idx, mine.max_seq_len) == (
            ref.vocab_info.size,
            ref.vocab_info.pad_idx,
            factory.config.max_seq_len,
        )
        dref = get_sonar_text_decoder_hub().get_model_config(dec_name)
        dec = decoder_config(store.card(dec_name))
        assert (dec.model_dim, dec.num_layers, dec.num_heads, dec.ffn_inner_dim) == (
            dref.model_dim,
            dref.num_decoder_layers,
            dref.num_encoder_attn_heads,
            dref.ffn_inner_dim,
        )
        assert (dec.vocab_size, dec.pad_idx, dec.max_seq_len) == (
            dref.vocab_info.size,
            dref.vocab_info.pad_idx,
            dref.max_seq_len,
        )


def test_download_lands_where_fairseq2_looks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fairseq2_reference: None
) -> None:
    served = tmp_path / "served"
    served.mkdir()
    (served / "weights.pt").write_bytes(b"x" * 1000)
    cache = tmp_path / "cache"
    monkeypatch.setenv("FAIRSEQ2_CACHE_DIR", str(cache))
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.delenv(name, raising=False)
    server = FileServer(served)
    try:
        url = f"{server.url}/weights.pt"
        assert cached(url) is None
        path = fetch(url)
        assert path == entry_dir(url) / "weights.pt" and path.read_bytes() == b"x" * 1000
        assert fetch(url) == path and server.requests == ["/weights.pt"]  # cached: no request
        with pytest.raises(DownloadError, match="404"):
            fetch(f"{server.url}/missing.pt")
    finally:
        server.close()
    from fairseq2.assets import StandardAssetDownloadManager
    from fairseq2.file_system import LocalFileSystem
    from fairseq2.utils.progress import _NoopProgressReporter
    from fairseq2.utils.uri import Uri

    progress = _NoopProgressReporter()
    manager = StandardAssetDownloadManager(cache, LocalFileSystem(), progress, progress)
    assert manager.download_model(Uri.parse(url), local_only=True) == path
