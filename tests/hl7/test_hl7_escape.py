"""HL7 v2 escape sequences (v2.5.1 §2.7, v2.7 §2.7 for \\P\\): the decoding table, the
encoding table, and round trips of arbitrary values through set → encode → parse → get.

Documented normalisation: CR LF in a value is written as one line break (\\.br\\) and so
reads back as LF. A lone CR is written as \\X0D\\ and reads back as CR.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.hl7.delimiters import DEFAULT_DELIMITERS, Delimiters
from gateway.hl7.escape import escape, unescape
from gateway.hl7.message import parse_message

MESSAGES = Path(__file__).parents[1] / "messages"
D = DEFAULT_DELIMITERS
TRUNCATING = Delimiters(truncation="#")

# -- decoding ---------------------------------------------------------------------------


@pytest.mark.parametrize(("wire", "value"), [
    ("plain", "plain"),
    ("\\F\\", "|"),
    ("\\S\\", "^"),
    ("\\T\\", "&"),
    ("\\R\\", "~"),
    ("\\E\\", "\\"),
    ("a\\F\\b\\S\\c\\T\\d\\R\\e\\E\\f", "a|b^c&d~e\\f"),
    ("line 1\\.br\\line 2", "line 1\nline 2"),
    ("\\X41\\", "A"),
    ("\\X414243\\", "ABC"),
    ("\\X0D0A\\", "\r\n"),
    ("\\Xc3a9\\", "é"),  # hex digits in either case, decoded in the message charset (UTF-8)
    ("\\XE9\\", "é"),  # not valid UTF-8 on its own: read byte for byte rather than refused
    ("\\E\\F\\E\\", "\\F\\"),  # an escaped escape sequence stays text
    # Sequences the codec does not interpret are kept exactly as written.
    ("\\H\\bold\\N\\", "\\H\\bold\\N\\"),
    ("\\Zvendor\\", "\\Zvendor\\"),
    ("\\.sp2\\", "\\.sp2\\"),
    ("\\.in+4\\", "\\.in+4\\"),
    ("\\C2842\\", "\\C2842\\"),
    ("\\M2442\\", "\\M2442\\"),
    ("\\X\\", "\\X\\"),  # no hex digits
    ("\\X4\\", "\\X4\\"),  # odd number of hex digits
    ("\\XZZ\\", "\\XZZ\\"),  # not hex
    ("\\x41\\", "\\x41\\"),  # lower-case x is not an escape
    ("\\P\\", "\\P\\"),  # truncation exists only when MSH-2 declares it
    ("\\\\", "\\\\"),  # empty sequence
    ("lone \\ escape", "lone \\ escape"),
    ("ends with \\", "ends with \\"),
    ("\\F\\ then lone \\", "| then lone \\"),
])
def test_unescape_decodes_the_escape_table(wire: str, value: str) -> None:
    assert unescape(wire, D) == value


def test_unescape_decodes_truncation_when_declared() -> None:
    assert unescape("cut here\\P\\", TRUNCATING) == "cut here#"


def test_unescape_uses_the_message_charset_for_hex() -> None:
    assert unescape("\\XE9\\", D, "iso-8859-1") == "é"
    assert unescape("\\XC5D1\\", D, "iso-8859-2") == "ĹŃ"
    assert unescape("\\XC3A9\\", D, "utf-8") == "é"


def test_unescape_works_with_other_delimiters() -> None:
    d = Delimiters(field="!", component="@", repetition="*", escape="/", subcomponent="%")
    assert unescape("/F/ /S/ /R/ /T/ /E/ /.br/ \\F\\", d) == "! @ * % / \n \\F\\"


# -- encoding ---------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "wire"), [
    ("plain", "plain"),
    ("a|b", "a\\F\\b"),
    ("a^b", "a\\S\\b"),
    ("a&b", "a\\T\\b"),
    ("a~b", "a\\R\\b"),
    ("a\\b", "a\\E\\b"),
    ("\\F\\", "\\E\\F\\E\\"),  # text that looks like an escape sequence stays text
    ("one\ntwo", "one\\.br\\two"),
    ("one\r\ntwo", "one\\.br\\two"),  # CR LF is one line break
    ("one\rtwo", "one\\X0D\\two"),  # a lone CR is kept as a CR
    ("tab\tstays", "tab\tstays"),
    ("frame\x0bstart", "frame\\X0B\\start"),  # MLLP start block
    ("frame\x1cend", "frame\\X1C\\end"),  # MLLP end block
    ("nul\x00", "nul\\X00\\"),
    ("# is text", "# is text"),
    ("é ✓ 試験", "é ✓ 試験"),
])
def test_escape_encodes_delimiters_terminators_and_control_characters(
        value: str, wire: str) -> None:
    assert escape(value, D) == wire


def test_escape_encodes_truncation_when_declared() -> None:
    assert escape("a#b", TRUNCATING) == "a\\P\\b"


# -- properties ---------------------------------------------------------------------------


def _normalised(value: str) -> str:
    return value.replace("\r\n", "\n")


@st.composite
def delimiter_sets(draw: st.DrawFn) -> Delimiters:
    """Any five (or six) distinct punctuation characters, as a sender may declare them."""
    chars = draw(st.lists(st.sampled_from("|^~\\&#!@$%*+/:;=?_`{}"), min_size=6, max_size=6,
                          unique=True))
    truncation = chars[5] if draw(st.booleans()) else ""
    return Delimiters(field=chars[0], component=chars[1], repetition=chars[2],
                      escape=chars[3], subcomponent=chars[4], truncation=truncation)


# Text with every delimiter, line breaks, controls and non-ASCII over-represented; any
# character UTF-8 can write (a lone surrogate cannot be written in any charset: see below).
values = st.text(st.one_of(st.sampled_from("|^~\\&#\r\n\x0b\x1c\tFSTREX.br"),
                           st.characters(codec="utf-8")), max_size=40)


@given(value=values, d=delimiter_sets())
def test_unescape_inverts_escape(value: str, d: Delimiters) -> None:
    assert unescape(escape(value, d), d) == _normalised(value)


@given(value=values, d=delimiter_sets())
def test_escaped_text_has_no_delimiter_terminator_or_frame_byte(value: str, d: Delimiters) -> None:
    wire = escape(value, d)
    forbidden = {d.field, d.component, d.repetition, d.subcomponent, d.truncation,
                 "\r", "\n", "\x0b", "\x1c"} - {""}
    assert not forbidden & set(wire)


@given(wire=st.text(st.sampled_from("\\FSTREXP.br0123456789ABCDEFZHN é"), max_size=30))
def test_unescape_never_fails_and_keeps_what_it_does_not_know(wire: str) -> None:
    value = unescape(wire, D)
    assert isinstance(value, str)
    if "\\" not in wire:
        assert value == wire


# -- round trips through a message --------------------------------------------------------

UTF8_MESSAGE = (MESSAGES / "codec_v2.5.1_adt_a01_escapes.hl7").read_bytes()
LATIN1_MESSAGE = (MESSAGES / "codec_8859_1.hl7").read_bytes()
PATHS = ["PID-5.2", "PID-5(2).3", "PID-3(2).4.2", "PID-13", "OBX-5", "ZPI-2.2.2", "ZZZ[2]-4.1",
         "MSH-4.1"]


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(value=values, path=st.sampled_from(PATHS))
def test_any_value_survives_set_encode_parse_get(value: str, path: str) -> None:
    message = parse_message(UTF8_MESSAGE)
    message.set(path, value)
    reread = parse_message(message.encode())
    assert reread.get(path) == _normalised(value)
    assert reread.segment_ids[:7] == ["MSH", "EVN", "PID", "NK1", "PV1", "OBX", "ZPI"]


latin1_values = st.text(st.one_of(st.sampled_from("|^~\\&\r\n\x0b"),
                                  st.characters(max_codepoint=0xFF)), max_size=40)


@given(value=latin1_values, path=st.sampled_from(["PID-5.1", "PID-11.3", "NTE-3"]))
def test_any_latin1_value_survives_an_8859_1_message(value: str, path: str) -> None:
    message = parse_message(LATIN1_MESSAGE)
    message.set(path, value)
    data = message.encode()
    data.decode("iso-8859-1")  # still one byte per character, as MSH-18 says
    assert parse_message(data).get(path) == _normalised(value)


@given(value=values, d=delimiter_sets())
def test_any_value_survives_any_delimiters(value: str, d: Delimiters) -> None:
    encoding = d.component + d.repetition + d.escape + d.subcomponent + d.truncation
    data = (f"MSH{d.field}{encoding}{d.field}A{d.field}B{d.field}C{d.field}D{d.field}20240101"
            f"{d.field}{d.field}ADT{d.component}A01{d.field}C1{d.field}P{d.field}2.7\r"
            f"PID{d.field}1\r").encode()
    message = parse_message(data)
    assert message.delimiters == d
    message.set("PID-5(2).2.2", value)
    assert parse_message(message.encode()).get("PID-5(2).2.2") == _normalised(value)


def test_a_lone_surrogate_is_refused_when_set() -> None:
    message = parse_message(UTF8_MESSAGE)
    with pytest.raises(ValueError, match="PID-5.2"):
        message.set("PID-5.2", "x\ud800")
    assert message.encode() == UTF8_MESSAGE
