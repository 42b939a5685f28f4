"""Parity of qwen_edu.tokenizer with tiktoken, Hugging Face tokenizers and transformers; trainer and bad-input tests."""
import json, random, unicodedata
from pathlib import Path
import pytest
import regex
from qwen_edu.tokenizer import (BPETokenizer, PATTERN, QWEN_SPECIAL_TOKENS, count_pretokens, split_pretokens,
                                stdlib_corpus, train_bpe_fast, train_bpe_slow, _PRETOKEN_RE, split_ascii, PretokenTable,
                                bpe_encode_words)

tiktoken = pytest.importorskip('tiktoken')
tokenizers = pytest.importorskip('tokenizers')

MULTI = """Hello world, 你好世界! Привет, мир — как дела? مرحبا بالعالم، كيف حالك؟ नमस्ते दुनिया, आप कैसे हैं?
สวัสดีชาวโลก ภาษาไทยไม่มีการเว้นวรรคระหว่างคำ こんにちは世界、カタカナとひらがな。 안녕하세요 세계
Γειά σου Κόσμε · שלום עולם · Բարեւ աշխարհ · გამარჯობა · ሰላም ልዑል · ⠓⠑⠇⠇⠕ · ᚠᚢᚦᚨᚱᚲ
Emoji: 👩‍👩‍👧‍👦 👨🏽‍💻 🏳️‍🌈 ❤️‍🔥 🇯🇵🇫🇷 1️⃣ #️⃣ 🧑🏿‍🤝‍🧑🏻 😀😃😄
Combining: e\u0301 a\u0308 n\u0303 q\u0307\u0323 ậ Z̴̡̪̫͇͚̆̂ͥ̾ͬ a\u20dd \u0915\u094d\u0937
CRLF lines\r\nsecond\r\n\r\n  indented\r\n\ttab\x0bvt\x0cff\x1cfs\x1fus\x85nel\xa0nbsp\u2028ls\u3000ideo
Whitespace runs:          end     \n\n\n\n      \t\t\t   x
Numbers: 1234567890 3.14159 -42 1e-10 0x1F ٣٤٥ ½ Ⅻ ①②③ ２０２５年
Code: def f(x: int) -> int:\n    return x ** 2  # it's I'LL we've they'd\n\nclass A(B): pass;;; {}[]()<>!=
URLs https://example.com/a?b=c&d=e#frag mail@example.org C:\\Users\\x\\file.txt
"Quotes" 'single' «guillemets» „German“ 「Japanese」 — en–dash … ellipsis ‰ ∑∫√∞ ≠ ≤ ≥
"""


@pytest.fixture(scope='module')
def qwen():
    return BPETokenizer.from_tiktoken()


@pytest.fixture(scope='module')
def enc(qwen):
    return tiktoken.Encoding(name='qwen', pat_str=PATTERN, special_tokens=QWEN_SPECIAL_TOKENS,
                             mergeable_ranks={b: i for i, b in enumerate(qwen.token_bytes)})


@pytest.fixture(scope='module')
def raw():
    "Qwen's vocabulary without normalisation: tiktoken's behaviour."
    return BPETokenizer.from_tiktoken(normalization=None)


@pytest.fixture(scope='module')
def qwen_hf_dir(qwen, tmp_path_factory):
    "The real vocabulary written by save_hf (merges recovered from the ranks)."
    return qwen.save_hf(tmp_path_factory.mktemp('qwen_hf'))


@pytest.fixture(scope='module')
def qwen_hf(qwen_hf_dir):
    return tokenizers.Tokenizer.from_file(str(qwen_hf_dir / 'tokenizer.json'))


@pytest.fixture(scope='module')
def corpus():
    "~2.5 MB: standard-library source, the pydoc topics, and many scripts (NFC-normalised: Qwen normalises, tiktoken does not)."
    from pydoc_data.topics import topics
    rnd = random.Random(0)
    lines = MULTI.splitlines(keepends=True)
    shuffled = ''.join(rnd.choice(lines) for _ in range(3000))
    text = stdlib_corpus(2_000_000) + '\n'.join(topics[k] for k in sorted(topics)) + MULTI * 20 + shuffled
    return unicodedata.normalize('NFC', text)


def test_reference_ids(qwen):
    assert qwen.encode('Hello world, 你好世界') == [9707, 1879, 11, 220, 108386, 99489]
    assert qwen.vocab_size == 151665 and len(qwen.token_bytes) == 151643
    assert qwen.special_tokens == QWEN_SPECIAL_TOKENS and qwen.eos_id == 151643
    assert list(QWEN_SPECIAL_TOKENS.values()) == list(range(151643, 151665))


def test_tiktoken_parity_large_corpus(qwen, enc, corpus):
    assert qwen.encode(corpus) == enc.encode_ordinary(corpus)
    assert qwen.decode(qwen.encode(corpus)) == corpus


def test_tiktoken_parity_per_line_and_specials(qwen, enc):
    for line in unicodedata.normalize('NFC', MULTI).splitlines(keepends=True):
        assert qwen.encode(line) == enc.encode_ordinary(line), line
    s = '<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<tool_call>\n{}\n</tool_call><|endoftext|>'
    assert qwen.encode(s, allowed_special='all') == enc.encode(s, allowed_special='all')
    assert qwen.encode(s, disallowed_special=()) == enc.encode(s, disallowed_special=())


def test_nfc_is_applied(qwen):
    assert qwen.encode('cafe\u0301') == qwen.encode('caf\u00e9')
    assert qwen.decode(qwen.encode('cafe\u0301')) == 'caf\u00e9'


def test_split_pretokens_matches_regex():
    rnd = random.Random(1)
    alphabet = list(" \n\n\r\t\x0b\x0c\x1c\x85\xa0\u3000\u2028\u2029aZz09'sSlLdD.#(-_éü你😀\u0301٣")
    for _ in range(5000):
        s = ''.join(rnd.choice(alphabet) for _ in range(rnd.randrange(1, 60)))
        assert split_pretokens(s) == _PRETOKEN_RE.findall(s), repr(s)
    big = stdlib_corpus(1_000_000) + MULTI
    assert split_pretokens(big) == regex.findall(PATTERN, big)


def test_fast_trainer_equals_slow_reference():
    from pydoc_data.topics import topics
    text = '\n'.join(topics[k] for k in sorted(topics))[:60_000] + MULTI
    counts = count_pretokens(text)
    assert train_bpe_fast(counts, 300) == train_bpe_slow(counts, 300)
    for wc in [{'aaaaaaaaa': 5, 'aa': 1, 'aaa': 2}, {'abab': 3, 'baba': 3, 'ab': 1},
               count_pretokens('ab bc abc cab bca abcabc ' * 4 + 'xxyxxyxxy yyx ' * 3)]:
        assert train_bpe_fast(wc, 60) == train_bpe_slow(wc, 60)


def test_train_api_and_tie_rule():
    tok = BPETokenizer.train(['aab aab', 'ab'], 257)
    a, b = (tok.token_bytes.index(bytes([c])) for c in b'ab')
    assert tok.merges == [(a, b, 256)]  # 'ab' (3 times) beats 'aa' (2 times)
    tok2 = BPETokenizer.train('ba ab', 257)  # both pairs once: the smaller (left id, right id) wins
    assert tok2.merges[0][:2] == min((a, b), (b, a))
    tok3 = BPETokenizer.train('x<|endoftext|>y' * 10, 300, special_tokens=['<|endoftext|>'])
    assert tok3.vocab_size <= 300 and tok3.special_tokens == {'<|endoftext|>': len(tok3.token_bytes)}
    assert not any(b'<|' in t for t in tok3.token_bytes[256:])  # special strings are not learned


@pytest.fixture(scope='module')
def trained():
    text = stdlib_corpus(300_000)
    return BPETokenizer.train(text, 2000, special_tokens=['<|endoftext|>', '<|im_start|>', '<|im_end|>'])


def test_save_hf_roundtrip_tokenizers_and_transformers(trained, tmp_path):
    trained.save_hf(tmp_path)
    hf = tokenizers.Tokenizer.from_file(str(tmp_path / 'tokenizer.json'))
    probe = unicodedata.normalize('NFC', stdlib_corpus(400_000)[300_000:] + MULTI)
    assert hf.encode(probe).ids == trained.encode(probe)
    assert hf.decode(trained.encode(probe)) == probe
    s = 'a<|im_start|>b<|endoftext|>'
    assert hf.encode(s).ids == trained.encode(s, allowed_special='all')
    assert hf.get_vocab_size() == trained.vocab_size
    transformers = pytest.importorskip('transformers')
    ft = transformers.PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
    assert ft(probe[:20_000])['input_ids'] == trained.encode(probe[:20_000])
    back = BPETokenizer.from_hf(tmp_path)
    assert back.encode(probe) == trained.encode(probe) and back.special_tokens == trained.special_tokens


def test_real_vocab_as_hf_files_matches_tiktoken(qwen, enc, corpus, qwen_hf_dir, qwen_hf, tmp_path):
    assert len(qwen.get_merges()) == 151643 - 256
    hf = qwen_hf
    part = corpus[:600_000] + corpus[-200_000:]
    assert hf.encode(part).ids == enc.encode_ordinary(part)
    assert hf.encode('<|im_start|>x<|im_end|>').ids == [151644, 87, 151645]
    # from_hf: tokenizer.json, and the older vocab.json + merges.txt layout
    tj = json.loads((qwen_hf_dir / 'tokenizer.json').read_text())
    old = tmp_path / 'old'; old.mkdir()
    (old / 'vocab.json').write_text(json.dumps(tj['model']['vocab'], ensure_ascii=False))
    (old / 'merges.txt').write_text('#version: 0.2\n' + '\n'.join(tj['model']['merges']) + '\n')
    (old / 'tokenizer_config.json').write_text(json.dumps({'added_tokens_decoder': {
        str(i): {'content': s, 'special': True} for s, i in QWEN_SPECIAL_TOKENS.items()}}))
    for path in [qwen_hf_dir, old]:
        t = BPETokenizer.from_hf(path)
        assert t.encode(part) == enc.encode_ordinary(part)
        assert t.encode('<|im_end|>', allowed_special='all') == [151645]


def test_bad_input_errors(qwen, trained, tmp_path):
    with pytest.raises(TypeError, match='expects a str'): qwen.encode(b'bytes')
    with pytest.raises(TypeError, match='expects a str'): qwen.encode(None)
    with pytest.raises(ValueError, match="disallowed special token '<|im_end|>'"): qwen.encode('x<|im_end|>')
    with pytest.raises(ValueError, match='unknown special'): qwen.encode('x', allowed_special={'<|bogus|>'})
    with pytest.raises(ValueError, match='ints in 0..151664'): qwen.decode([1, 151665])
    with pytest.raises(ValueError, match='cannot decode id -1'): qwen.decode([-1])
    assert qwen.id_to_token(9707) == 'Hello' and qwen.id_to_token(151645) == '<|im_end|>'
    with pytest.raises(ValueError, match='no token with id 151665'): qwen.id_to_token(151665)
    with pytest.raises(ValueError, match='no token with id'): qwen.id_to_token('9707')
    with pytest.raises(ValueError, match='vocab_size must be'): BPETokenizer.train('abc', 100)
    with pytest.raises(TypeError, match='must be str'): BPETokenizer.train([b'abc'], 300)
    with pytest.raises(FileNotFoundError): BPETokenizer.from_tiktoken(tmp_path / 'missing.tiktoken')
    with pytest.raises(FileNotFoundError): BPETokenizer.from_hf(tmp_path / 'nothing')
    bad = tmp_path / 'bad.tiktoken'; bad.write_text('not-a-line\n')
    with pytest.raises(ValueError, match='expected'): BPETokenizer.from_tiktoken(bad)


def test_specials_encode_plain_when_asked(qwen):
    s = 'a <|im_end|> b'
    plain = qwen.encode(s, disallowed_special=())
    assert 151645 not in plain and qwen.decode(plain) == s
    assert qwen.encode(s, allowed_special={'<|im_end|>'}).count(151645) == 1
    assert qwen.decode([151644, 151645]) == '<|im_start|><|im_end|>'


def test_partial_utf8_and_batch(qwen):
    ids = qwen.encode('€')  # 3 bytes
    raw = qwen.decode_bytes(ids)
    assert raw == '€'.encode() and qwen.decode(ids[:0]) == ''
    assert qwen.encode_batch(['a', 'b c']) == [qwen.encode('a'), qwen.encode('b c')]
    import numpy as np
    assert qwen.decode(np.array(qwen.encode('numpy ids'))) == 'numpy ids'


def test_stream_decoder_never_emits_broken_characters(qwen):
    from qwen_edu.tokenizer import StreamDecoder
    text = unicodedata.normalize('NFC', MULTI)
    stream = StreamDecoder(qwen)
    pieces = [stream(i) for i in qwen.encode(text)]
    assert ''.join(pieces) + stream.flush() == text
    assert not any('\ufffd' in p for p in pieces)
    cut = StreamDecoder(qwen)
    assert cut(qwen.encode('€')[:1] if len(qwen.encode('€')) > 1 else [qwen.token_bytes.index(b'\xe2')]) == ''
    assert cut.flush() == '\ufffd'


def test_cli(tmp_path, capsys):
    from qwen_edu.tokenizer import tokenizer_cli
    assert tokenizer_cli(['encode', 'Hello world, 你好世界']) == 0
    assert capsys.readouterr().out.split() == ['9707', '1879', '11', '220', '108386', '99489']
    tokenizer_cli(['decode', '9707', '1879'])
    assert capsys.readouterr().out == 'Hello world\n'
    (tmp_path / 'a.txt').write_text('the quick brown fox jumps over the lazy dog\n' * 50)
    tokenizer_cli(['train', str(tmp_path / 'a.txt'), '--vocab-size', '280', '--out', str(tmp_path / 'tok')])
    t = BPETokenizer.from_hf(tmp_path / 'tok')
    tokenizer_cli(['encode', '--tokenizer', str(tmp_path / 'tok'), 'the lazy dog<|endoftext|>', '--allow-special'])
    assert list(map(int, capsys.readouterr().out.split()[-4:]))[-1] == t.special_tokens['<|endoftext|>']
    with pytest.raises(SystemExit): tokenizer_cli(['frobnicate'])


def test_lone_surrogates_like_tiktoken(qwen, enc):
    for s in ['a\ud800b', '\udfff', 'x\ud83d\ude00y', 'ok \ud800\ud800 ok']:
        assert qwen.encode(s) == enc.encode_ordinary(s), repr(s)


def test_ascii_state_machine_matches_regex():
    "The compiled ASCII split (rules 1-7 of the notebook) equals the regex: exhaustively on short strings, fuzzed on long ones."
    import itertools
    small = " \n\r\t\x0b's'Le0.a"
    for n in range(1, 5):
        for t in itertools.product(small, repeat=n):
            s = ''.join(t)
            assert split_ascii(s) == _PRETOKEN_RE.findall(s), repr(s)
    rnd = random.Random(2)
    alphabet = list("     \n\n\r\r\t\x0b\x0c\x1c\x00\x7f'''sStTmMdDrReEvVlL0123456789aZ.#(-_!")
    for _ in range(20000):
        s = ''.join(rnd.choice(alphabet) for _ in range(rnd.randrange(1, 80)))
        assert split_ascii(s) == _PRETOKEN_RE.findall(s), repr(s)
    code = ''.join(c for c in stdlib_corpus(1_000_000) if c.isascii())
    assert split_ascii(code) == _PRETOKEN_RE.findall(code)
    with pytest.raises(ValueError, match='needs ASCII'): split_ascii('caf\u00e9')


def test_pretoken_table_cold_warm_growth(qwen, enc):
    "Cold (empty table, grows from 4 entries), warm, and mixed ASCII / non-ASCII text all give tiktoken's ids."
    text = ''.join(c for c in stdlib_corpus(300_000) if c.isascii()) + "\n it's   \t\r\n 'LL 12 \n\n  "
    ref = enc.encode_ordinary(text)
    pt = PretokenTable(capacity=4)
    assert pt.encode(text, qwen._table).tolist() == ref
    n = len(pt)
    assert pt.encode(text, qwen._table).tolist() == ref and len(pt) == n
    extra = text[:1000] + ' brandnewpretokenxyz'
    assert pt.encode(extra, qwen._table).tolist() == enc.encode_ordinary(extra) and len(pt) == n + 1
    qwen.clear_cache()
    mixed = text[:5000] + ' \u00e9\n  \u00fc\n' + text[5000:10000] + '\u4f60\u597d\n\tx'
    assert qwen.encode(mixed) == enc.encode_ordinary(mixed)
    assert qwen.encode(mixed) == enc.encode_ordinary(mixed)  # warm


# ---- normalisation: which tokenizer the ids equal, and what decode gives back ----
HANGUL_JAMO = '\u1100\u1161\u11a8 \u1112\u1161\u11ab\u1100\u1173\u11af'  # conjoining jamo: NFC composes 각 한글
COMPAT = 'ﬁnance ① ② ＡＢＣ１２３ ｶﾀｶﾅ ㎏ ½ ²  ẛ̣'  # compatibility characters: NFC keeps them, NFKC folds them
SINGLETONS = '\u2126 \u212b \uf900 \u0344 \u1f71'  # ohm, angstrom, a CJK compatibility ideograph...: NFC changes them
NFD_TEXTS = [unicodedata.normalize('NFD', s) for s in ['café naïve Ångström', 'Tiếng Việt có dấu', '한국어 텍스트',
                                                        'Ελληνικά τόνος', MULTI]]
NORM_PROBES = NFD_TEXTS + [HANGUL_JAMO, COMPAT, SINGLETONS, 'e\u0301' * 300, 'a\u0308\u0301\u0323x' * 50]


def decomposable_code_points(form='NFD') -> str:
    "Every code point that `form` changes, each decomposed, one per line."
    cps = (chr(c) for c in range(0x110000) if not 0xD800 <= c < 0xE000)
    return '\n'.join(unicodedata.normalize(form, c) for c in cps if unicodedata.normalize(form, c) != c)


def assigned_shuffled(n=300_000, seed=0) -> str:
    "`n` random characters assigned in Unicode 14 (Python 3.11's unicodedata), in random order."
    assigned = [chr(c) for c in range(0x110000) if unicodedata.category(chr(c)) not in ('Cn', 'Cs')]
    rnd = random.Random(seed)
    return ''.join(rnd.choice(assigned) for _ in range(n))


def test_normalization_probes_change_under_nfc():
    assert all(unicodedata.normalize('NFC', s) != s for s in NFD_TEXTS + [HANGUL_JAMO, SINGLETONS])
    assert unicodedata.normalize('NFC', COMPAT) == COMPAT != unicodedata.normalize('NFKC', COMPAT)


# tokenizers' NFC tables predate Unicode 13: it leaves U+11935 U+11930 (Dives Akuru) apart, Python (Unicode 14)
# composes them to U+11938. The only NFC difference over all code points and their decompositions (test below).
HF_NFC_GAP = '\U00011935\U00011930'


def test_nfc_equals_tokenizers_normalizer_but_one_sequence():
    from tokenizers import normalizers
    nfc = normalizers.NFC()
    cps = [chr(c) for c in range(0x110000) if not 0xD800 <= c < 0xE000]
    differ = {s for c in cps for s in {c, unicodedata.normalize('NFD', c), unicodedata.normalize('NFKD', c)}
              if unicodedata.normalize('NFC', s) != nfc.normalize_str(s)}
    assert differ <= {HF_NFC_GAP}


def test_default_nfc_equals_hf_tokenizers_and_tiktoken_on_nfc(qwen, enc, qwen_hf):
    "Default (NFC): ids equal Hugging Face tokenizers on any text, tiktoken on the NFC text; decode gives the NFC form."
    assert qwen.normalization == 'NFC'
    for s in NORM_PROBES + [decomposable_code_points('NFD'), decomposable_code_points('NFKD'), assigned_shuffled(seed=1)]:
        ids = qwen.encode(s)
        assert qwen.encode(s.replace(HF_NFC_GAP, '')) == qwen_hf.encode(s.replace(HF_NFC_GAP, '')).ids, s[:40]
        assert ids == enc.encode_ordinary(unicodedata.normalize('NFC', s)), s[:40]
        assert qwen.decode(ids) == unicodedata.normalize('NFC', s) == qwen.normalize(s)
    assert qwen.encode('cafe\u0301') != enc.encode_ordinary('cafe\u0301')  # why the distinction matters


def test_transformers_qwen2_tokenizer_equals_default(qwen, qwen_hf_dir):
    transformers = pytest.importorskip('transformers')
    ht = transformers.Qwen2Tokenizer.from_pretrained(str(qwen_hf_dir))
    for s in NORM_PROBES[:-2]:
        assert ht(s, add_special_tokens=False)['input_ids'] == qwen.encode(s), s[:40]


def test_no_normalization_equals_tiktoken_and_roundtrips(raw, enc, qwen):
    "normalization=None: ids equal tiktoken on any text and decode(encode(x)) == x (x without lone surrogates)."
    assert raw.normalization is None
    for s in NORM_PROBES + [assigned_shuffled(), decomposable_code_points('NFD')]:
        ids = raw.encode(s)
        assert ids == enc.encode_ordinary(s), s[:40]
        assert raw.decode(ids) == s
    with pytest.raises(ValueError, match="normalization must be one of"): BPETokenizer(qwen.token_bytes[:256], [], normalization='nfc')
    with pytest.raises(ValueError, match="normalization must be one of"): setattr(raw, 'normalization', 'NFX')


def test_normalization_is_saved_and_loaded(trained, tmp_path):
    nfkc = BPETokenizer(trained.token_bytes, trained.merges, trained.special_tokens, normalization='NFKC')
    for tok, name in [(trained, 'nfc'), (nfkc, 'nfkc'), (BPETokenizer(trained.token_bytes, trained.merges, normalization=None), 'none')]:
        d = tok.save_hf(tmp_path / name)
        hf = tokenizers.Tokenizer.from_file(str(d / 'tokenizer.json'))
        back = BPETokenizer.from_hf(d)
        assert back.normalization == tok.normalization
        for s in NORM_PROBES:
            assert hf.encode(s).ids == tok.encode(s) == back.encode(s), (name, s[:40])
    assert nfkc.decode(nfkc.encode(COMPAT)) == unicodedata.normalize('NFKC', COMPAT)
    assert BPETokenizer.from_hf(tmp_path / 'nfc', normalization=None).normalization is None
    tj = json.loads((tmp_path / 'nfc' / 'tokenizer.json').read_text())
    tj['normalizer'] = {'type': 'Lowercase'}
    (tmp_path / 'lower.json').write_text(json.dumps(tj))
    with pytest.raises(ValueError, match=r"lower\.json.*normalizer.*Lowercase"): BPETokenizer.from_hf(tmp_path / 'lower.json')


def test_train_uses_the_normalization():
    text = unicodedata.normalize('NFD', 'café résumé naïve ' * 50)
    assert not any('\u0301'.encode() in b for b in BPETokenizer.train(text, 300).token_bytes[256:])  # NFC: composed é
    raw = BPETokenizer.train(text, 300, normalization=None)
    assert raw.normalization is None and raw.decode(raw.encode(text)) == text


# ---- decode: ids must be ints ----
def test_decode_rejects_non_int_ids(qwen):
    import numpy as np
    for bad, what in [([1.0], 'float'), ([True], 'bool'), ([9707, False], 'bool'), (np.array([1.0, 2.0]), 'float'),
                      ('abc', 'str'), ([None], 'NoneType'), (True, 'bool'), (1.0, 'float')]:
        with pytest.raises(TypeError, match=f'ids must be ints.*got {what}'): qwen.decode(bad)
        with pytest.raises(TypeError, match='ids must be ints'): qwen.decode_bytes(bad)
    assert qwen.decode([np.int64(9707), np.int32(1879)]) == 'Hello world'
    assert qwen.decode(np.array([9707, 1879], np.uint32)) == qwen.decode(9707) + ' world'
    assert qwen.decode([]) == '' and qwen.id_to_token(np.int64(9707)) == 'Hello'
    with pytest.raises(ValueError, match='no token with id True'): qwen.id_to_token(True)


# ---- control tokens: the empty string, and Qwen's `special` flags ----
def test_empty_special_token_refused(trained, tmp_path):
    n = len(trained.token_bytes)
    with pytest.raises(ValueError, match='empty'): BPETokenizer(trained.token_bytes, trained.merges, {'': n})
    with pytest.raises(ValueError, match='empty'): BPETokenizer.train('abc abc', 300, special_tokens=[''])
    d = trained.save_hf(tmp_path / 'tok')
    tj = json.loads((d / 'tokenizer.json').read_text())
    tj['added_tokens'].append(dict(tj['added_tokens'][0], id=trained.vocab_size, content=''))
    (d / 'tokenizer.json').write_text(json.dumps(tj))
    with pytest.raises(ValueError, match=r"tokenizer\.json: added_tokens\[3\] \(id %d\) is the empty string" % trained.vocab_size): BPETokenizer.from_hf(d)


QWEN_NOT_SPECIAL = ['<tool_call>', '</tool_call>', '<|fim_prefix|>', '<|fim_middle|>', '<|fim_suffix|>', '<|fim_pad|>',
                    '<|repo_name|>', '<|file_sep|>']  # `special: false` in Qwen2.5's released tokenizer.json / tokenizer_config.json


def test_save_hf_special_flags_match_qwen_release(qwen, qwen_hf_dir, tmp_path):
    "Qwen2.5's files: ids 151643-151656 special, 151657-151664 (tool call, FIM, repo tokens) not special."
    expected = {i: i < 151657 for i in range(151643, 151665)}
    tj = json.loads((qwen_hf_dir / 'tokenizer.json').read_text())
    assert {t['id']: t['special'] for t in tj['added_tokens']} == expected
    assert [t['content'] for t in tj['added_tokens'] if not t['special']] == QWEN_NOT_SPECIAL
    cfg = json.loads((qwen_hf_dir / 'tokenizer_config.json').read_text())
    assert {int(k): v['special'] for k, v in cfg['added_tokens_decoder'].items()} == expected
    assert sorted(qwen.not_special) == sorted(QWEN_NOT_SPECIAL)
    back = BPETokenizer.from_hf(qwen_hf_dir)
    assert back.not_special == qwen.not_special and back.special_tokens == qwen.special_tokens
    assert back.encode('<tool_call>', allowed_special='all') == [151657]  # still a control token for encode
    transformers = pytest.importorskip('transformers')
    ft = transformers.PreTrainedTokenizerFast.from_pretrained(str(qwen_hf_dir))
    ids = qwen.encode('<|im_start|>x<tool_call>y</tool_call><|im_end|>', allowed_special='all')
    assert ft.decode(ids, skip_special_tokens=True) == 'x<tool_call>y</tool_call>'


# ---- loading: clear errors for malformed tokenizer.json ----
@pytest.mark.parametrize('content, match', [
    ('[1, 2, 3]', 'a JSON object.*got a list'), ('{"version": "1.0"}', 'no "model"'),
    ('{"model": {"type": "BPE", "merges": []}}', 'model.vocab'), ('{"model": {"type": "BPE", "vocab": {}}}', 'model.merges'),
    ('{"model": []}', '"model" must be an object'), ('{not json', 'not valid JSON'),
    ('{"model": {"vocab": {}, "merges": []}, "added_tokens": [{"id": 5}]}', 'added_tokens.*content')])
def test_malformed_tokenizer_json(tmp_path, content, match):
    p = tmp_path / 'tokenizer.json'; p.write_text(content)
    with pytest.raises(ValueError, match=match) as e: BPETokenizer.from_hf(p)
    assert str(p) in str(e.value)


# ---- long pre-tokens: O(n log n) BPE, same ids ----
def test_long_pieces_equal_tiktoken_and_the_simple_loop(qwen, enc, trained):
    rnd = random.Random(3)
    alphabets = ['a', 'ab', 'abcdefghijklmnopqrstuvwxyz', 'aaaaaaab', '你好世界的一是不了人我在有他这', 'éèêëàâäôöûüç',
                 'абвгдеёжзийклмнопрстуфхцчшщъыьэюя', 'กขฃคฅฆงจฉชซฌญฎฏ']
    pieces = [''.join(rnd.choice(a) for _ in range(rnd.choice([129, 300, 1000, 5000]))) for a in alphabets for _ in range(3)]
    pieces += ['a' * n for n in [127, 128, 129, 130, 1000, 4097]]
    for s in pieces:
        assert len(split_pretokens(s)) == 1
        assert qwen.encode(s) == enc.encode_ordinary(s), s[:20]
        for tok in (qwen, trained):  # the heap (long pieces) against the simple loop (long_from = never)
            b = s.encode()
            assert bpe_encode_words([b], tok._table) == bpe_encode_words([b], tok._table, long_from=1 << 62)
    # the limits of merges_from_ranks: only merges with priority below the limit
    words = [p.encode() for p in pieces[:6]]
    lim = [500, 5000, 50_000, 1 << 62, 0, 1]
    assert bpe_encode_words(words, qwen._table, limits=lim) == bpe_encode_words(words, qwen._table, limits=lim, long_from=1 << 62)


def test_200k_char_pieces_finish(qwen, enc):
    "Quadratic BPE took minutes on these; the heap does them in about tiktoken's time (no time limit asserted here)."
    rnd = random.Random(4)
    cjk = ''.join(chr(rnd.randrange(0x4e00, 0x9fa5)) for _ in range(200_000))
    for s in ['a' * 200_000, cjk, ''.join(rnd.choice('abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ') for _ in range(200_000))]:
        assert qwen.encode(s) == enc.encode_ordinary(s)


def test_many_new_pretokens_take_the_uncached_path(enc):
    "A long stretch of mostly new pre-tokens (random text without spaces) is BPE'd in order without the cache: same ids."
    tok = BPETokenizer.from_tiktoken()
    rnd = random.Random(6)
    latin = [chr(c) for c in range(0x21, 0x100) if not chr(c).isspace() and chr(c).isprintable()]
    s = ''.join(rnd.choice(latin) for _ in range(60_000)) + '\u4f60\u597d' * 3000 + 'é' * 200
    assert len(split_pretokens(s)) > 4096
    assert tok.encode(s) == enc.encode_ordinary(s) == tok.encode(s)
    assert len(tok._cache) == 0  # the bookkeeping was skipped
    short = 'naïve café ' * 10  # a short stretch still fills the cache
    assert tok.encode(short) == enc.encode_ordinary(short) and len(tok._cache) > 0


# ---- loading: refuse the tokenizer.json components the encoder does not reproduce ----
_BL = {'type': 'ByteLevel', 'add_prefix_space': False, 'trim_offsets': False, 'use_regex': False}
QWEN25_LAYOUT = {  # Qwen2.5's released tokenizer.json, everything but the vocabulary, the merges and the added tokens
    'normalizer': {'type': 'NFC'},
    'pre_tokenizer': {'type': 'Sequence', 'pretokenizers': [
        {'type': 'Split', 'pattern': {'Regex': PATTERN}, 'behavior': 'Isolated', 'invert': False}, _BL]},
    'post_processor': _BL, 'decoder': _BL,
    'model': {'type': 'BPE', 'dropout': None, 'unk_token': None, 'continuing_subword_prefix': '', 'end_of_word_suffix': '',
              'fuse_unk': False, 'byte_fallback': False, 'ignore_merges': False}}
GPT2_RE = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


def _pre(i, **kw):
    "Qwen's pre-tokenizer with step `i` of the Sequence changed."
    pre = json.loads(json.dumps(QWEN25_LAYOUT['pre_tokenizer']))
    pre['pretokenizers'][i].update(kw)
    return pre


def _write_variant(tj, path, change):
    tj = json.loads(json.dumps(tj)) if len(tj['model']['vocab']) < 10_000 else dict(tj, model=dict(tj['model']))
    change(tj)
    path.write_text(json.dumps(tj, ensure_ascii=False))
    return path


def _set(key, value): return lambda tj: tj.__setitem__(key, value)
def _set_model(key, value): return lambda tj: tj['model'].__setitem__(key, value)


REFUSED = [
    (_set('pre_tokenizer', {'type': 'Whitespace'}), r'pre_tokenizer.*Whitespace'),
    (_set('pre_tokenizer', None), r'pre_tokenizer None'),
    (_set('pre_tokenizer', dict(_BL, use_regex=True)), r'pre_tokenizer.*ByteLevel'),  # GPT-2's regex
    (_set('pre_tokenizer', _pre(0, pattern={'Regex': GPT2_RE})), r'pre_tokenizer.*Split'),
    (_set('pre_tokenizer', _pre(0, pattern={'String': ' '})), r'pre_tokenizer.*String'),
    (_set('pre_tokenizer', _pre(0, behavior='Removed')), r'pre_tokenizer.*Removed'),
    (_set('pre_tokenizer', _pre(0, invert=True)), r'pre_tokenizer.*invert'),
    (_set('pre_tokenizer', _pre(1, add_prefix_space=True)), r'pre_tokenizer.*add_prefix_space'),
    (_set('pre_tokenizer', _pre(1, use_regex=True)), r'pre_tokenizer.*use_regex'),
    (_set('pre_tokenizer', {'type': 'Sequence', 'pretokenizers': QWEN25_LAYOUT['pre_tokenizer']['pretokenizers'] + [
        {'type': 'Digits', 'individual_digits': True}]}), r'pre_tokenizer.*Digits'),
    (_set('decoder', {'type': 'WordPiece', 'prefix': '##', 'cleanup': True}), r'decoder.*WordPiece'),
    (_set('decoder', None), r'decoder None'),
    (_set('post_processor', {'type': 'TemplateProcessing', 'single': [], 'pair': [], 'special_tokens': {}}),
     r'post_processor.*TemplateProcessing'),
    (_set_model('type', 'WordPiece'), r'model.type.*WordPiece'),
    (_set_model('dropout', 0.1), r'model.dropout.*0.1'),
    (_set_model('continuing_subword_prefix', '##'), r'model.continuing_subword_prefix'),
    (_set_model('end_of_word_suffix', '</w>'), r'model.end_of_word_suffix'),
    (_set_model('ignore_merges', True), r'model.ignore_merges'),
    (lambda tj: tj['added_tokens'][1].update(lstrip=True), r"added_tokens\[1\].*lstrip"),
    (lambda tj: tj['added_tokens'][0].update(single_word=True), r"added_tokens\[0\].*single_word"),
]


@pytest.mark.parametrize('change, match', REFUSED, ids=[m for _, m in REFUSED])
def test_from_hf_refuses_what_the_encoder_does_not_reproduce(trained, tmp_path, change, match):
    tj = trained.tokenizer_json()
    p = _write_variant(tj, tmp_path / 'variant.json', change)
    with pytest.raises(ValueError, match=match) as e: BPETokenizer.from_hf(p)
    assert str(p) in str(e.value)


def test_real_qwen_layout_loads_and_one_changed_component_is_refused(qwen_hf_dir, tmp_path):
    tj = json.loads((qwen_hf_dir / 'tokenizer.json').read_text())
    assert {k: tj[k] for k in QWEN25_LAYOUT if k != 'model'} == {k: v for k, v in QWEN25_LAYOUT.items() if k != 'model'}
    assert {k: v for k, v in tj['model'].items() if k not in ('vocab', 'merges')} == QWEN25_LAYOUT['model']
    assert [t['id'] for t in tj['added_tokens']] == list(range(151643, 151665))
    for change, match in [REFUSED[0], REFUSED[13]]:  # Whitespace pre-tokenizer, WordPiece model
        p = _write_variant(tj, tmp_path / 'variant.json', change)
        with pytest.raises(ValueError, match=match): BPETokenizer.from_hf(p)


def test_from_hf_accepts_what_changes_only_offsets_or_decoding_flags(trained, tmp_path):
    "transformers' Qwen2Converter layout (other ByteLevel flags), no post-processor, older files without ignore_merges."
    tj = trained.tokenizer_json()
    hf = tokenizers.Tokenizer.from_str(json.dumps(tj))
    pt = tokenizers.pre_tokenizers
    hf.pre_tokenizer = pt.Sequence([pt.Split(tokenizers.Regex(PATTERN), behavior='isolated', invert=False),
                                    pt.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = tokenizers.decoders.ByteLevel()
    hf.post_processor = tokenizers.processors.ByteLevel(trim_offsets=False)
    hf.save(str(tmp_path / 'converter.json'))
    variants = [tmp_path / 'converter.json',
                _write_variant(tj, tmp_path / 'no_post.json', _set('post_processor', None)),
                _write_variant(tj, tmp_path / 'old.json', lambda tj: tj['model'].pop('ignore_merges'))]
    s = MULTI + '<|im_start|>x<|im_end|>'
    for p in variants:
        back = BPETokenizer.from_hf(p)
        assert back.encode(s, allowed_special='all') == trained.encode(s, allowed_special='all'), p.name
        hf = tokenizers.Tokenizer.from_file(str(p))
        assert hf.encode(s).ids == trained.encode(s, allowed_special='all'), p.name


# ---- loading: added-token ids must be unique and follow the vocabulary without gaps ----
def _added(tj, i, **kw):
    def change(tj): tj['added_tokens'][i].update(kw)
    return change


def test_from_hf_refuses_bad_added_token_ids(trained, tmp_path):
    n = len(trained.token_bytes)
    tj = trained.tokenizer_json()
    assert [t['id'] for t in tj['added_tokens']] == [n, n + 1, n + 2]
    cases = [
        (_added(tj, 1, id=n), rf"added_tokens\[1\] \('<\|im_start\|>'\) has id {n}, as added_tokens\[0\] \('<\|endoftext\|>'\)"),
        (_added(tj, 2, content='<|endoftext|>'), r"added_tokens\[2\] '<\|endoftext\|>' \(id %d\) is already added_tokens\[0\] \(id %d\)" % (n + 2, n)),
        (_added(tj, 2, id=10**9), rf"ids must be {n}\.\.{n + 2}.*1000000000"),
        (_added(tj, 2, id=n + 3), rf"ids must be {n}\.\.{n + 2}.*{n + 3}"),
        (_added(tj, 0, id=5), rf"ids must be {n}\.\.{n + 2}.*got 5.*'<\|endoftext\|>'"),
        (_added(tj, 0, id=True), r"int 'id'"),
    ]
    for change, match in cases:
        p = _write_variant(tj, tmp_path / 'variant.json', change)
        with pytest.raises(ValueError, match=match) as e: BPETokenizer.from_hf(p)
        assert str(p) in str(e.value)
    # the order of the list does not matter, only the ids
    p = _write_variant(tj, tmp_path / 'shuffled.json', lambda tj: tj['added_tokens'].reverse())
    assert BPETokenizer.from_hf(p).special_tokens == trained.special_tokens
    # vocab.json + merges.txt + tokenizer_config.json: the same rules
    d = tmp_path / 'old'; d.mkdir()
    (d / 'vocab.json').write_text(json.dumps(tj['model']['vocab'], ensure_ascii=False))
    (d / 'merges.txt').write_text('\n'.join(tj['model']['merges']) + '\n')
    for atd, match in [({str(n): {'content': 'a'}, str(n + 1): {'content': 'a'}}, r"'a' \(id %d\) is already" % (n + 1)),
                       ({str(n): {'content': 'a'}, str(10**9): {'content': 'b'}}, rf"ids must be {n}\.\.{n + 1}.*1000000000")]:
        (d / 'tokenizer_config.json').write_text(json.dumps({'added_tokens_decoder': atd}))
        with pytest.raises(ValueError, match=match) as e: BPETokenizer.from_hf(d)
        assert 'tokenizer_config.json' in str(e.value)


def test_constructor_refuses_duplicate_and_gapped_special_ids(trained):
    n = len(trained.token_bytes)
    with pytest.raises(ValueError, match=rf"'b' has id {n}, as 'a'"): BPETokenizer(trained.token_bytes, trained.merges, {'a': n, 'b': n})
    with pytest.raises(ValueError, match=rf"ids must be {n}\.\.{n}.*1000000000"): BPETokenizer(trained.token_bytes, trained.merges, {'a': 10**9})
    assert BPETokenizer(trained.token_bytes, trained.merges, {'b': n + 1, 'a': n}).vocab_size == n + 2
    with pytest.raises(ValueError, match="special_tokens lists '<a>' twice"): BPETokenizer.train('abc abc', 300, special_tokens=['<a>', '<b>', '<a>'])


# ---- the fast path (appendix A5, qwen_edu.fastbpe) against the simple versions of chapter 01 ----
def test_fastbpe_sits_below_tokenizer():
    "qwen_edu.fastbpe imports nothing from the package (qwen_edu.tokenizer imports it, never the other way)."
    import ast
    src = (Path(__file__).resolve().parent.parent / 'qwen_edu' / 'fastbpe.py').read_text()
    mods = {n.module or '' for n in ast.walk(ast.parse(src)) if isinstance(n, ast.ImportFrom) and (n.level or 'qwen_edu' in (n.module or ''))}
    mods |= {a.name for n in ast.walk(ast.parse(src)) if isinstance(n, ast.Import) for a in n.names if a.name.startswith('qwen_edu')}
    assert mods == set(), mods


def test_pretoken_cache_equals_simple_encoder(trained):
    "PretokenCache (every path: long and short ASCII stretches, other scripts, the uncached path) = bpe_naive per pre-token."
    from qwen_edu.tokenizer import BYTE_IDS, bpe_naive, pretokenize
    from qwen_edu.fastbpe import PretokenCache
    ranks = {(a, b): (r, n) for r, (a, b, n) in enumerate(trained.merges)}
    rnd = random.Random(7)
    latin = [chr(c) for c in range(0x21, 0x100) if not chr(c).isspace() and chr(c).isprintable()]
    text = unicodedata.normalize('NFC', stdlib_corpus(40_000) + MULTI + 'ab cd\n' + ''.join(rnd.choice(latin) for _ in range(40_000)))
    simple = [i for w in pretokenize(text) for i in bpe_naive([int(BYTE_IDS[c]) for c in w.encode()], ranks)]
    pc = PretokenCache(trained._table, _PRETOKEN_RE)
    assert pc.encode(text) == simple and pc.encode(text) == simple  # cold, then warm
    assert trained.encode(text) == simple


def test_build_merge_table_refuses_bad_input():
    from qwen_edu.tokenizer import BYTE_IDS
    from qwen_edu.fastbpe import build_merge_table
    with pytest.raises(ValueError, match='256 bytes'): build_merge_table([1], [2], [0], [256], BYTE_IDS[:10])
    with pytest.raises(ValueError, match='one entry per merge'): build_merge_table([1, 2], [2], [0], [256], BYTE_IDS)
    with pytest.raises(ValueError, match='21 bits'): build_merge_table([1], [2 ** 21], [0], [256], BYTE_IDS)
    t = build_merge_table([], [], [], [], BYTE_IDS)
    assert bpe_encode_words([b'abc'], t) == [[int(BYTE_IDS[c]) for c in b'abc']]
