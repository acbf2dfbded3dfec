"""Which builds of each eBPF program the loader tries, in which order (exporter.kernel.programs.variants)."""

from __future__ import annotations

from exporter.kernel.programs import PROGRAMS, REQUEST_MODES, Variant, variants

TRAFFIC = next(p for p in PROGRAMS if p.name == "tcp_traffic")
STATE = next(p for p in PROGRAMS if p.name == "tcp_state")


def test_hot_path_prefers_tp_btf_then_falls_back_to_raw_tracepoints() -> None:
    # HTTP/2 needs the tail-called walker: a kernel refusing it still gets HTTP/1.x.
    assert variants(TRAFFIC) == [
        Variant(("-DPODNET_TP_BTF",), tp_btf=True),
        Variant(("-DPODNET_TP_BTF", "-DPODNET_NO_HTTP2"), tp_btf=True),
        Variant(("-DPODNET_TP_BTF", "-DPODNET_NO_PEEK"), tp_btf=True),
        Variant(()),
        Variant(("-DPODNET_NO_HTTP2",)),
        Variant(("-DPODNET_NO_PEEK",)),
    ]


def test_http1_leaves_http2_out() -> None:
    assert variants(TRAFFIC, requests="http1") == [
        Variant(("-DPODNET_TP_BTF", "-DPODNET_NO_HTTP2"), tp_btf=True),
        Variant(("-DPODNET_TP_BTF", "-DPODNET_NO_PEEK"), tp_btf=True),
        Variant(("-DPODNET_NO_HTTP2",)),
        Variant(("-DPODNET_NO_PEEK",)),
    ]


def test_tls_is_built_into_every_build_that_reads_payloads() -> None:
    assert variants(TRAFFIC, requests="http", tls="openssl") == [
        Variant(("-DPODNET_TP_BTF", "-DPODNET_TLS"), tp_btf=True),
        Variant(("-DPODNET_TP_BTF", "-DPODNET_NO_HTTP2", "-DPODNET_TLS"), tp_btf=True),
        Variant(("-DPODNET_TP_BTF", "-DPODNET_NO_PEEK"), tp_btf=True),
        Variant(("-DPODNET_TLS",)),
        Variant(("-DPODNET_NO_HTTP2", "-DPODNET_TLS")),
        Variant(("-DPODNET_NO_PEEK",)),
    ]
    assert variants(STATE, "http", "openssl") == [Variant(())]


def test_without_requests_nothing_peeks() -> None:
    assert variants(TRAFFIC, requests="off") == [
        Variant(("-DPODNET_TP_BTF", "-DPODNET_NO_REQUESTS"), tp_btf=True),
        Variant(("-DPODNET_NO_REQUESTS",)),
    ]


def test_turns_count_requests_without_reading_payloads() -> None:
    assert variants(TRAFFIC, requests="turns") == [
        Variant(("-DPODNET_TP_BTF", "-DPODNET_NO_PEEK"), tp_btf=True),
        Variant(("-DPODNET_NO_PEEK",)),
    ]


def test_only_the_hot_path_is_btf_typed_and_tracks_requests() -> None:
    assert [p.name for p in PROGRAMS if p.btf_typed] == ["tcp_traffic"]
    assert [p.name for p in PROGRAMS if p.tracks_requests] == ["tcp_traffic"]
    # One build whatever the request mode: nothing to describe, nothing to retry.
    for mode in REQUEST_MODES:
        assert variants(STATE, mode) == [Variant(())]
        assert variants(STATE, mode)[0].describe() == "raw tracepoints"


def test_builds_are_described_for_logs_and_doctor() -> None:
    assert [v.describe() for v in variants(TRAFFIC)] == [
        "BTF-typed tracepoints",
        "BTF-typed tracepoints, requests without HTTP/2",
        "BTF-typed tracepoints, requests without HTTP recognition",
        "raw tracepoints",
        "raw tracepoints, requests without HTTP/2",
        "raw tracepoints, requests without HTTP recognition",
    ]
    assert variants(TRAFFIC, tls="openssl")[0].describe() == "BTF-typed tracepoints, TLS (OpenSSL)"
    assert variants(TRAFFIC, requests="off")[0].describe() == "BTF-typed tracepoints, requests off"
