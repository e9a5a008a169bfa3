//! The committed seed corpora, and mutations of them as proptest strategies.

use std::path::{Path, PathBuf};

use proptest::prelude::*;
use proptest::test_runner::Config;

/// `cases` cases, or `PROPTEST_CASES` from the environment if it is set.
pub fn cases(cases: u32) -> Config {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(cases);
    Config {
        cases,
        ..Config::default()
    }
}

/// The folder of the gateway package.
pub fn manifest_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Every file of `dir` (relative to the gateway package), by name.
pub fn files(dir: &str) -> Vec<(String, Vec<u8>)> {
    let dir: PathBuf = manifest_dir().join(dir);
    let mut out: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("a readable directory entry").path())
        .filter(|p| p.is_file())
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&p).expect("a readable corpus file"))
        })
        .collect();
    out.sort();
    assert!(!out.is_empty(), "{} holds no seeds", dir.display());
    out
}

/// The seed corpus of one target (`tests/corpus/<target>/`).
pub fn seeds(target: &str) -> Vec<(String, Vec<u8>)> {
    files(&format!("tests/corpus/{target}"))
}

/// One edit of an input.
#[derive(Debug, Clone)]
pub enum Mutation {
    /// Flip one bit of one byte.
    FlipBit(usize, u8),
    /// Replace one byte.
    SetByte(usize, u8),
    /// Insert a token of the input's language (or a hostile one).
    Insert(usize, &'static str),
    /// Insert one character, at a character boundary.
    InsertChar(usize, char),
    /// Delete up to `n` bytes.
    Delete(usize, usize),
    /// Cut the input short.
    Truncate(usize),
    /// Repeat a stretch of up to `n` bytes in place.
    Duplicate(usize, usize),
    /// Swap two lines.
    SwapLines(usize, usize),
    /// Repeat one line.
    DuplicateLine(usize),
}

/// Position `raw` in a collection of `len` items (never 0).
fn at(raw: usize, len: usize) -> usize {
    raw % len
}

fn position(i: &usize, len: usize) -> usize {
    at(*i, len + 1)
}

fn apply(input: &mut Vec<u8>, m: &Mutation) {
    let len = input.len();
    match m {
        Mutation::FlipBit(i, bit) if len > 0 => input[at(*i, len)] ^= 1 << (bit % 8),
        Mutation::SetByte(i, b) if len > 0 => input[at(*i, len)] = *b,
        Mutation::Insert(i, token) => {
            let at = position(i, len);
            input.splice(at..at, token.bytes());
        }
        Mutation::InsertChar(i, c) => {
            let mut at = position(i, len);
            // Continuation bytes of UTF-8 are 0b10xx_xxxx: move to the start of a character.
            while at < len && at > 0 && input[at] & 0xC0 == 0x80 {
                at -= 1;
            }
            let mut buf = [0; 4];
            input.splice(at..at, c.encode_utf8(&mut buf).bytes());
        }
        Mutation::Delete(i, n) => {
            let at = position(i, len);
            input.drain(at..(at + n).min(len));
        }
        Mutation::Truncate(i) => input.truncate(position(i, len)),
        Mutation::Duplicate(i, n) => {
            let at = position(i, len);
            let stretch = input[at..(at + n).min(len)].to_vec();
            input.splice(at..at, stretch);
        }
        Mutation::SwapLines(a, b) => {
            let mut lines: Vec<Vec<u8>> = input
                .split_inclusive(|c| *c == b'\n')
                .map(<[u8]>::to_vec)
                .collect();
            if !lines.is_empty() {
                let (a, b) = (at(*a, lines.len()), at(*b, lines.len()));
                lines.swap(a, b);
                *input = lines.concat();
            }
        }
        Mutation::DuplicateLine(i) => {
            let mut lines: Vec<Vec<u8>> = input
                .split_inclusive(|c| *c == b'\n')
                .map(<[u8]>::to_vec)
                .collect();
            if !lines.is_empty() {
                let i = at(*i, lines.len());
                let line = lines[i].clone();
                lines.insert(i, line);
                *input = lines.concat();
            }
        }
        _ => {}
    }
}

/// Characters that trouble position arithmetic and text handling: multi-byte, wide, combining,
/// invisible, line breaks that are not `\n`, and the byte-order mark.
pub fn awkward_char() -> impl Strategy<Value = char> {
    prop_oneof![
        3 => any::<char>(),
        2 => prop::sample::select(vec![
            'é', 'ß', '€', '漢', '🔥', '\u{301}', '\u{200b}', '\u{feff}', '\u{2028}', '\u{85}',
            '\u{10ffff}', '\r', '\t', '\0', '\u{7f}',
        ]),
    ]
}

fn mutation(tokens: &'static [&'static str]) -> impl Strategy<Value = Mutation> {
    prop_oneof![
        1 => (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::FlipBit(i, b)),
        1 => (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::SetByte(i, b)),
        3 => (any::<usize>(), prop::sample::select(tokens)).prop_map(|(i, t)| Mutation::Insert(i, t)),
        2 => (any::<usize>(), awkward_char()).prop_map(|(i, c)| Mutation::InsertChar(i, c)),
        1 => (any::<usize>(), 1usize..16).prop_map(|(i, n)| Mutation::Delete(i, n)),
        1 => (any::<usize>()).prop_map(Mutation::Truncate),
        1 => (any::<usize>(), 1usize..32).prop_map(|(i, n)| Mutation::Duplicate(i, n)),
        1 => (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Mutation::SwapLines(a, b)),
        1 => (any::<usize>()).prop_map(Mutation::DuplicateLine),
    ]
}

/// A seed of `target` with one to four mutations applied.
pub fn mutant(target: &str, tokens: &'static [&'static str]) -> impl Strategy<Value = Vec<u8>> {
    let seeds: Vec<Vec<u8>> = seeds(target).into_iter().map(|(_, data)| data).collect();
    mutant_of(seeds, tokens)
}

/// One of `seeds` with one to four mutations applied.
pub fn mutant_of(
    seeds: Vec<Vec<u8>>,
    tokens: &'static [&'static str],
) -> impl Strategy<Value = Vec<u8>> {
    (
        prop::sample::select(seeds),
        prop::collection::vec(mutation(tokens), 1..5),
    )
        .prop_map(|(mut input, mutations)| {
            for m in &mutations {
                apply(&mut input, m);
            }
            input
        })
}

#[test]
fn mutations_edit_where_they_say() {
    let mut input = b"ab\ncd\n".to_vec();
    apply(&mut input, &Mutation::SwapLines(0, 1));
    assert_eq!(input, b"cd\nab\n");
    let mut input = "é".as_bytes().to_vec();
    // Inserting "in the middle" of é goes before it, keeping the text UTF-8.
    apply(&mut input, &Mutation::InsertChar(1, 'x'));
    assert_eq!(String::from_utf8(input).unwrap(), "xé");
    let mut input = b"abc".to_vec();
    apply(&mut input, &Mutation::Delete(1, 100));
    assert_eq!(input, b"a");
}
