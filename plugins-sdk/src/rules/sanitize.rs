//! Prompt cleaning and blocked-term screening.
//!
//! Prompts come from untrusted users and are fed to a text encoder: invisible and
//! direction-changing characters can hide content from reviewers and logs, and lookalike
//! spellings can slip past naive term lists. [`sanitize`] normalises the text, reports what it
//! changed, and rejects prompts containing blocked terms, including common obfuscations.
//!
//! Blocked-term matching works on whole words: a term matches only when it is not preceded or
//! followed by another letter or digit, so `ass` does not match `class`, and `nude` does not
//! match `nudes` either (list plural forms explicitly). On top of that it sees through
//! case, diacritics (`nüde`), leetspeak (`nud3`, `@ss`, `k1ll`), repeated letters (`nuuude`),
//! punctuation between letters (`n.u.d.e`, `n_u-d*e`) and letters spelled out with spaces
//! (`n u d e`; each letter must then stand alone, so `nu de` is two ordinary words).
//! Multi-word terms match across any run of whitespace or punctuation, but not run together.
//! Lookalike letters from other scripts (Cyrillic `а` for Latin `a`) are not folded.

use serde::{Deserialize, Serialize};
use unicode_normalization::UnicodeNormalization;

use super::request::FieldError;

/// Limits for [`sanitize`]; operators extend the blocked list without rebuilding the policy.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SanitizerConfig {
    /// Longest prompt passed on, in characters; longer ones are truncated at a word boundary.
    pub max_chars: u32,
    /// Words or phrases that make a prompt rejected (matched as described in the module docs).
    pub blocked_terms: Vec<String>,
}

impl Default for SanitizerConfig {
    fn default() -> Self {
        Self {
            max_chars: 2000,
            blocked_terms: Vec::new(),
        }
    }
}

impl SanitizerConfig {
    /// Refuses a zero length limit and blocked terms that could never match (no letters or
    /// digits once normalised), so mistakes surface at load time.
    pub fn check(&self) -> Result<(), String> {
        if self.max_chars == 0 {
            return Err("max_chars must be >= 1".into());
        }
        for (i, term) in self.blocked_terms.iter().enumerate() {
            if Term::new(term).letters.is_empty() {
                return Err(format!("blocked_terms[{i}] has no letters or digits"));
            }
        }
        Ok(())
    }
}

/// What [`sanitize`] decided, so the caller can pass the prompt on as is, pass the cleaned
/// text on (and log the changes), or refuse the job.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sanitized {
    /// The prompt is fine exactly as given.
    Unchanged,
    /// The prompt was cleaned; use `text`.
    Cleaned {
        /// The cleaned prompt.
        text: String,
        /// Short human descriptions of each kind of change, with counts, for logs and clients.
        changes: Vec<String>,
    },
    /// The prompt cannot be used (`empty` or `unsafe_content` on `/input/prompt`).
    Reject(FieldError),
}

/// Cleans `prompt`: NFKC, invisible/bidi/control characters removed, whitespace collapsed,
/// length capped; then screens the result for blocked terms. Never echoes a matched term.
pub fn sanitize(prompt: &str, cfg: &SanitizerConfig) -> Sanitized {
    Sanitizer::new(cfg.clone()).sanitize(prompt)
}

/// A sanitizer with its blocked terms prepared once, for callers that clean many prompts
/// with one configuration (policy instances, the host's native fallback).
pub struct Sanitizer {
    cfg: SanitizerConfig,
    terms: Vec<Term>,
}

impl Sanitizer {
    /// Prepares `cfg`'s blocked terms.
    pub fn new(cfg: SanitizerConfig) -> Self {
        let terms = cfg
            .blocked_terms
            .iter()
            .map(|t| Term::new(t))
            .filter(|t| !t.letters.is_empty())
            .collect();
        Self { cfg, terms }
    }

    /// The configuration it was built from.
    pub fn config(&self) -> &SanitizerConfig {
        &self.cfg
    }

    /// Cleans one prompt; see [`sanitize`].
    pub fn sanitize(&self, prompt: &str) -> Sanitized {
        sanitize_prepared(prompt, &self.cfg, &self.terms)
    }
}

fn sanitize_prepared(prompt: &str, cfg: &SanitizerConfig, terms: &[Term]) -> Sanitized {
    let mut changes = Vec::new();
    // Remove the invisible classes first: none of them has a compatibility decomposition,
    // so removing before or after NFKC gives the same text, and what remains is very often
    // plain ASCII, which is its own NFKC form (the Unicode tables are the costly part).
    let mut counts = [0usize; 5];
    let mut stripped = String::with_capacity(prompt.len());
    for c in prompt.chars() {
        match class(c) {
            None => stripped.push(c),
            Some(0) => {
                counts[0] += 1;
                stripped.push(' ');
            }
            Some(k) => {
                if let Some(n) = counts.get_mut(k) {
                    *n += 1;
                }
            }
        }
    }
    let text: String = if stripped.is_ascii() {
        stripped
    } else {
        let nfkc: String = stripped.nfkc().collect();
        if nfkc != stripped {
            changes.push("normalized Unicode (NFKC)".to_string());
        }
        // NFKC can produce characters of the removal classes only from compatibility
        // forms of them; strip again so the result is clean either way.
        nfkc.chars()
            .filter(|&c| !matches!(class(c), Some(k) if k > 0))
            .collect()
    };
    let [breaks, controls, zero_width, bidi, tags] = counts;
    if breaks > 0 {
        changes.push(format!(
            "replaced {} with spaces",
            plural(breaks, "tab or newline character")
        ));
    }
    for (n, what) in [
        (controls, "control character"),
        (zero_width, "zero-width character"),
        (bidi, "bidi control character"),
        (tags, "invisible tag character"),
    ] {
        if n > 0 {
            changes.push(format!("removed {}", plural(n, what)));
        }
    }

    let collapsed = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if collapsed != text {
        changes.push("collapsed whitespace".to_string());
    }
    let mut text = collapsed;
    if text.is_empty() {
        return Sanitized::Reject(FieldError::new(
            "/input/prompt",
            "empty",
            "prompt is empty after removing invisible characters and whitespace",
        ));
    }

    let max = cfg.max_chars.max(1) as usize;
    if let Some((cap, _)) = text.char_indices().nth(max) {
        let cut = word_cut(&text, cap, max);
        text.truncate(cut);
        text.truncate(text.trim_end().len());
        changes.push(format!("truncated to {} characters", text.chars().count()));
    }

    let units = units(&text);
    let blocked = terms.iter().any(|t| t.found_in(&units));
    if blocked {
        return Sanitized::Reject(FieldError::new(
            "/input/prompt",
            "unsafe_content",
            "prompt contains content that is not allowed",
        ));
    }
    if text == prompt {
        Sanitized::Unchanged
    } else {
        Sanitized::Cleaned { text, changes }
    }
}

/// Which removal class a character falls in (index into the counts), or `None` to keep it.
fn class(c: char) -> Option<usize> {
    match c {
        c if c.is_control() && c.is_whitespace() => Some(0),
        '\u{200B}'..='\u{200D}' | '\u{2060}' | '\u{FEFF}' | '\u{180E}' | '\u{00AD}' => Some(2),
        '\u{200E}'
        | '\u{200F}'
        | '\u{061C}'
        | '\u{202A}'..='\u{202E}'
        | '\u{2066}'..='\u{2069}' => Some(3),
        // Unicode tag characters can smuggle invisible ASCII text past reviewers.
        '\u{E0000}'..='\u{E007F}' => Some(4),
        c if c.is_control() => Some(1),
        _ => None,
    }
}

fn plural(n: usize, what: &str) -> String {
    format!("{n} {what}{}", if n == 1 { "" } else { "s" })
}

/// Byte offset to cut `text` at, given `cap` (the byte offset of character number `max`):
/// the last space before the cap if it lies in the last 20% of the allowance, else the cap.
fn word_cut(text: &str, cap: usize, max: usize) -> usize {
    let head = text.get(..cap).unwrap_or(text);
    if text.get(cap..).is_some_and(|rest| rest.starts_with(' ')) {
        return cap;
    }
    let floor = max - max / 5;
    head.rfind(' ')
        .filter(|&b| head.get(..b).is_some_and(|s| s.chars().count() >= floor))
        .unwrap_or(cap)
}

/// A normalised character of the prompt, as the blocked-term matcher sees it.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Unit {
    /// A letter or digit; two options because `1` may stand for `i` or `l`.
    Letter([char; 2]),
    /// A leetspeak symbol (`@`, `$`, `!`, `|`): may be a letter or punctuation.
    Symbol(char),
    /// Any other non-space character: may separate obfuscated letters.
    Punct,
    /// Whitespace.
    Space,
}

fn is_mark(c: char) -> bool {
    matches!(c, '\u{0300}'..='\u{036F}' | '\u{1AB0}'..='\u{1AFF}' | '\u{1DC0}'..='\u{1DFF}'
        | '\u{20D0}'..='\u{20FF}' | '\u{FE20}'..='\u{FE2F}')
}

/// Lowercases, decomposes (NFKD) and drops combining marks, then classifies each character,
/// folding leetspeak digits and symbols.
fn units(text: &str) -> Vec<Unit> {
    // ASCII has no decompositions or combining marks: skip NFKD for it.
    let decomposed: Box<dyn Iterator<Item = char> + '_> = if text.is_ascii() {
        Box::new(text.chars())
    } else {
        Box::new(text.nfkd())
    };
    decomposed
        .flat_map(char::to_lowercase)
        .filter(|&c| !is_mark(c))
        .map(|c| match c {
            '0' => Unit::Letter(['o'; 2]),
            '1' => Unit::Letter(['i', 'l']),
            '3' => Unit::Letter(['e'; 2]),
            '4' => Unit::Letter(['a'; 2]),
            '5' => Unit::Letter(['s'; 2]),
            '7' => Unit::Letter(['t'; 2]),
            '8' => Unit::Letter(['b'; 2]),
            '@' => Unit::Symbol('a'),
            '$' => Unit::Symbol('s'),
            '!' => Unit::Symbol('i'),
            '|' => Unit::Symbol('l'),
            c if c.is_whitespace() => Unit::Space,
            c if c.is_alphanumeric() => Unit::Letter([c; 2]),
            _ => Unit::Punct,
        })
        .collect()
}

fn same(a: [char; 2], b: [char; 2]) -> bool {
    let ([a0, a1], [b0, b1]) = (a, b);
    a0 == b0 || a0 == b1 || a1 == b0 || a1 == b1
}

/// A blocked term normalised like the prompt: its letters, and where word breaks fall.
struct Term {
    letters: Vec<[char; 2]>,
    /// `breaks[k]`: the term has a word break just before letter `k`.
    breaks: Vec<bool>,
}

/// Matcher states for "k term letters matched", indexed by k (see [`Term::found_in`]).
#[derive(Clone)]
struct States {
    /// Just consumed a letter.
    letter: Vec<bool>,
    /// Inside punctuation after a letter that had a neighbouring letter.
    punct: Vec<bool>,
    /// Inside punctuation after a standalone letter (may still turn into a spelled-out gap).
    punct_alone: Vec<bool>,
    /// Inside a whitespace gap between spelled-out letters.
    spelled: Vec<bool>,
    /// Inside the gap at one of the term's own word breaks.
    word_gap: Vec<bool>,
}

impl States {
    fn new(len: usize) -> Self {
        let v = vec![false; len];
        Self {
            letter: v.clone(),
            punct: v.clone(),
            punct_alone: v.clone(),
            spelled: v.clone(),
            word_gap: v,
        }
    }

    fn any(&self) -> bool {
        [
            &self.letter,
            &self.punct,
            &self.punct_alone,
            &self.spelled,
            &self.word_gap,
        ]
        .iter()
        .any(|v| v.iter().any(|&b| b))
    }

    fn clear(&mut self) {
        for v in [
            &mut self.letter,
            &mut self.punct,
            &mut self.punct_alone,
            &mut self.spelled,
            &mut self.word_gap,
        ] {
            v.fill(false);
        }
    }
}

impl Term {
    fn new(term: &str) -> Self {
        let (mut letters, mut breaks, mut gap) = (Vec::new(), Vec::new(), false);
        for u in units(term) {
            match u {
                Unit::Letter(l) => {
                    breaks.push(gap && !letters.is_empty());
                    letters.push(l);
                    gap = false;
                }
                Unit::Symbol(c) => {
                    breaks.push(gap && !letters.is_empty());
                    letters.push([c; 2]);
                    gap = false;
                }
                Unit::Punct | Unit::Space => gap = true,
            }
        }
        Self { letters, breaks }
    }

    /// Whether the term occurs in `units` as a whole word, allowing the obfuscations listed in
    /// the module docs. A simulation of a small non-deterministic automaton with all start
    /// positions at once: O(units × term letters), no backtracking.
    fn found_in(&self, units: &[Unit]) -> bool {
        let m = self.letters.len();
        let Some(&first) = self.letters.first() else {
            return false;
        };
        let is_letter =
            |i: Option<usize>| matches!(i.and_then(|i| units.get(i)), Some(Unit::Letter(_)));
        // A letter standing alone (neither neighbour is a letter), as in "n u d e".
        let alone = |i: usize| !is_letter(i.checked_sub(1)) && !is_letter(i.checked_add(1));
        let brk = |k: usize| self.breaks.get(k).copied().unwrap_or(false);
        let (mut cur, mut next) = (States::new(m + 1), States::new(m + 1));
        // Whether any state of `cur` is set: most units neither continue nor start a match,
        // and skipping them keeps the common case at one comparison per unit.
        let mut active = false;
        for (i, &u) in units.iter().enumerate() {
            let as_letter = match u {
                Unit::Letter(l) => Some(l),
                Unit::Symbol(c) => Some([c; 2]),
                _ => None,
            };
            let starts = as_letter.is_some_and(|l| !is_letter(i.checked_sub(1)) && same(l, first));
            if !active && !starts {
                continue;
            }
            next.clear();
            if let Some(l) = as_letter {
                let iso = alone(i);
                if !is_letter(i.checked_sub(1)) && same(l, first) {
                    next.letter[1] = true;
                }
                for k in 1..=m {
                    let cont = cur.letter[k]
                        || cur.punct[k]
                        || cur.punct_alone[k]
                        || (cur.spelled[k] && iso);
                    // A repeat of the letter just matched ("nuuude").
                    if cont && same(l, self.letters[k - 1]) {
                        next.letter[k] = true;
                    }
                    if k < m && same(l, self.letters[k]) && ((cont && !brk(k)) || cur.word_gap[k]) {
                        next.letter[k + 1] = true;
                    }
                }
            }
            let gap = match u {
                Unit::Letter(_) => None,
                Unit::Space => Some(true),
                Unit::Symbol(_) | Unit::Punct => Some(false),
            };
            if let Some(space) = gap {
                let prev_alone = i.checked_sub(1).is_some_and(alone);
                for k in 1..m {
                    if brk(k) {
                        next.word_gap[k] = cur.letter[k] || cur.word_gap[k];
                    } else if space {
                        next.spelled[k] =
                            (cur.letter[k] && prev_alone) || cur.punct_alone[k] || cur.spelled[k];
                    } else {
                        next.punct[k] = (cur.letter[k] && !prev_alone) || cur.punct[k];
                        next.punct_alone[k] = (cur.letter[k] && prev_alone) || cur.punct_alone[k];
                        next.spelled[k] = cur.spelled[k];
                    }
                }
            }
            if next.letter[m] && !is_letter(i.checked_add(1)) {
                return true;
            }
            active = next.any();
            std::mem::swap(&mut cur, &mut next);
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(terms: &[&str]) -> SanitizerConfig {
        SanitizerConfig {
            blocked_terms: terms.iter().map(|t| t.to_string()).collect(),
            ..Default::default()
        }
    }

    fn cleaned(prompt: &str, cfg: &SanitizerConfig) -> (String, Vec<String>) {
        match sanitize(prompt, cfg) {
            Sanitized::Cleaned { text, changes } => (text, changes),
            other => panic!("expected Cleaned for {prompt:?}, got {other:?}"),
        }
    }

    fn rejected(prompt: &str, cfg: &SanitizerConfig) -> FieldError {
        match sanitize(prompt, cfg) {
            Sanitized::Reject(e) => e,
            other => panic!("expected Reject for {prompt:?}, got {other:?}"),
        }
    }

    fn blocked(term: &str, prompt: &str) -> bool {
        matches!(sanitize(prompt, &cfg(&[term])), Sanitized::Reject(e) if e.code == "unsafe_content")
    }

    #[test]
    fn plain_prompt_unchanged() {
        let c = SanitizerConfig::default();
        assert_eq!(
            sanitize("A professional headshot, soft light.", &c),
            Sanitized::Unchanged
        );
        assert_eq!(sanitize("Ünïcödé café 東京 😀", &c), Sanitized::Unchanged);
    }

    #[test]
    fn nfkc() {
        let (text, changes) = cleaned("ｈｅａｄｓｈｏｔ ﬁne", &SanitizerConfig::default());
        assert_eq!(text, "headshot fine");
        assert_eq!(changes, ["normalized Unicode (NFKC)"]);
    }

    #[test]
    fn invisible_characters_removed_with_counts() {
        let c = SanitizerConfig::default();
        let (text, changes) = cleaned("a\u{200B}b\u{FEFF}c", &c);
        assert_eq!(
            (text.as_str(), changes),
            ("abc", vec!["removed 2 zero-width characters".to_string()])
        );
        let (text, _) = cleaned("x\u{200C}\u{200D}\u{2060}\u{180E}\u{00AD}y", &c);
        assert_eq!(text, "xy");
        let (text, changes) = cleaned("\u{202E}abc\u{2066}d\u{200E}\u{200F}\u{061C}", &c);
        assert_eq!(
            (text.as_str(), changes),
            (
                "abcd",
                vec!["removed 5 bidi control characters".to_string()]
            )
        );
        let (text, changes) = cleaned("a\u{0007}b\u{0000}\u{007F}", &c);
        assert_eq!(
            (text.as_str(), changes),
            ("ab", vec!["removed 3 control characters".to_string()])
        );
        let (text, changes) = cleaned("hi\u{E0041}\u{E0042}", &c);
        assert_eq!(
            (text.as_str(), changes),
            ("hi", vec!["removed 2 invisible tag characters".to_string()])
        );
    }

    #[test]
    fn whitespace() {
        let c = SanitizerConfig::default();
        let (text, changes) = cleaned("a\tb\r\nc", &c);
        assert_eq!(text, "a b c");
        assert_eq!(
            changes,
            [
                "replaced 3 tab or newline characters with spaces",
                "collapsed whitespace"
            ]
        );
        let (text, changes) = cleaned("  a   b  ", &c);
        assert_eq!(
            (text.as_str(), changes),
            ("a b", vec!["collapsed whitespace".to_string()])
        );
        let (text, _) = cleaned("a\u{3000}\u{2028}b", &c);
        assert_eq!(text, "a b");
        let (text, changes) = cleaned("a\nb", &c);
        assert_eq!(
            (text.as_str(), changes),
            (
                "a b",
                vec!["replaced 1 tab or newline character with spaces".to_string()]
            )
        );
    }

    #[test]
    fn empty_rejected() {
        for p in ["", "   ", "\u{200B}\n\t", "\u{202E}\u{FEFF}"] {
            let e = rejected(p, &SanitizerConfig::default());
            assert_eq!(
                (e.field.as_str(), e.code.as_str()),
                ("/input/prompt", "empty"),
                "{p:?}"
            );
        }
    }

    #[test]
    fn truncation() {
        let c = SanitizerConfig {
            max_chars: 10,
            ..Default::default()
        };
        // No space in the last 20%: hard cut at the cap.
        let (text, changes) = cleaned(&"a".repeat(25), &c);
        assert_eq!(
            (text.as_str(), changes),
            ("aaaaaaaaaa", vec!["truncated to 10 characters".to_string()])
        );
        // A space in the last 20% (position 8 >= 8): cut there.
        assert_eq!(cleaned("aaaaaaaa bbbbbb", &c).0, "aaaaaaaa");
        // A space too early (position 3 < 8): hard cut.
        assert_eq!(cleaned("aaa bbbbbbbbbbbb", &c).0, "aaa bbbbbb");
        // The cap falls exactly on a space: clean cut.
        assert_eq!(cleaned("aaaaaaaaaa bb", &c).0, "aaaaaaaaaa");
        // Multi-byte characters are cut on character boundaries.
        let (text, _) = cleaned(&"é".repeat(30), &c);
        assert_eq!(text, "é".repeat(10));
        let (text, _) = cleaned(&"😀".repeat(30), &c);
        assert_eq!(text.chars().count(), 10);
        // Exactly at the limit: untouched.
        assert_eq!(sanitize(&"a".repeat(10), &c), Sanitized::Unchanged);
        let (text, changes) = cleaned(&"word ".repeat(1000), &SanitizerConfig::default());
        assert!(
            text.chars().count() <= 2000 && text.chars().count() >= 1600 && !text.ends_with(' ')
        );
        assert!(changes.iter().any(|c| c.starts_with("truncated to ")));
        // An unchecked zero limit still yields a non-empty prompt rather than panicking.
        let zero = SanitizerConfig {
            max_chars: 0,
            ..Default::default()
        };
        assert_eq!(cleaned("abc", &zero).0, "a");
    }

    #[test]
    fn blocked_reject_never_echoes_term() {
        let e = rejected("a Nude photo", &cfg(&["nude"]));
        assert_eq!(
            e,
            FieldError::new(
                "/input/prompt",
                "unsafe_content",
                "prompt contains content that is not allowed"
            )
        );
        // Checked even when nothing else changed, and after cleaning.
        assert!(blocked("nude", "nude"));
        assert!(blocked("nude", "nu\u{200B}de"));
        assert!(blocked("nude", "ｎｕｄｅ"));
    }

    #[test]
    fn word_boundaries_and_false_positives() {
        for p in [
            "Nude photo",
            "a nude.",
            "NUDE",
            "(nude)",
            "\"nude\"",
            "nude!",
            "nude,portrait",
            "my.nude.jpg",
        ] {
            assert!(blocked("nude", p), "{p}");
        }
        for p in ["denuded", "nudes", "nudity", "nud", "snude", "nude4"] {
            assert!(!blocked("nude", p), "{p}");
        }
        for p in [
            "class",
            "assistant",
            "bass",
            "Assam",
            "glass",
            "as",
            "a ss",
            "as s",
            "as. Sam",
            "A. S. Smith",
        ] {
            assert!(!blocked("ass", p), "{p}");
        }
        for p in ["ass", "the ass.", "asss", "ASS!"] {
            assert!(blocked("ass", p), "{p}");
        }
    }

    #[test]
    fn leetspeak() {
        for p in ["nud3", "NUD3", "nu|)e"] {
            assert_eq!(blocked("nude", p), !p.contains('|'), "{p}");
        }
        for p in ["@ss", "a$$", "4ss", "a55", "@$$"] {
            assert!(blocked("ass", p), "{p}");
        }
        for p in ["k1ll", "ki11", "k!ll", "ki||", "KILL"] {
            assert!(blocked("kill", p), "{p}");
        }
        assert!(blocked("boot", "8007"));
        assert!(!blocked("ass", "cl@ss"));
        // Terms are normalised the same way.
        assert!(blocked("@ss", "ass"));
        assert!(blocked("  NÜDE ", "nude"));
    }

    #[test]
    fn separators_and_spelling_out() {
        for p in [
            "n.u.d.e",
            "n u d e",
            "n-u-d-e",
            "n_u_d_e",
            "n*u*d*e",
            "N . U . D . E",
            "n/u/d/e",
            "nu-de",
            "n. u. d. e.",
        ] {
            assert!(blocked("nude", p), "{p}");
        }
        for p in ["nu de", "n ude", "nud e", "n u de", "in u d e s"] {
            assert!(!blocked("nude", p), "{p}");
        }
    }

    #[test]
    fn repeated_letters_and_diacritics() {
        for p in [
            "nuuude",
            "nnuuddee",
            "NUUUDEEE",
            "n u u d e",
            "nüde",
            "ñúdé",
            "n\u{0338}u\u{0338}d\u{0338}e\u{0338}",
        ] {
            assert!(blocked("nude", p), "{p}");
        }
        // A doubled letter in the term must appear at least twice.
        assert!(!blocked("ass", "as"));
        assert!(blocked("ass", "a.s.s"));
    }

    #[test]
    fn multi_word_terms() {
        for p in [
            "hate speech",
            "HATE\n\n speech",
            "some hate  speech here",
            "hate-speech",
            "h@te 5peech",
        ] {
            assert!(blocked("hate speech", p), "{p}");
        }
        for p in [
            "hatespeech",
            "h8te speech",
            "hate speeches",
            "hate",
            "whate speech",
        ] {
            assert!(!blocked("hate speech", p), "{p}");
        }
    }

    #[test]
    fn several_terms_and_linear_time() {
        let terms: Vec<String> = (0..100).map(|i| format!("badword{i}")).collect();
        let c = SanitizerConfig {
            blocked_terms: terms,
            max_chars: 5000,
        };
        let prompt = "a".repeat(2000) + " " + &"a a ".repeat(700);
        assert!(matches!(
            sanitize(&prompt, &c),
            Sanitized::Cleaned { .. } | Sanitized::Unchanged
        ));
        let hit = "x ".repeat(1000) + "b4dw0rd42";
        assert!(matches!(sanitize(&hit, &c), Sanitized::Reject(_)));
        assert!(blocked("aaaa", &"a".repeat(3000)));
    }

    #[test]
    fn config_check_and_serde() {
        assert_eq!(SanitizerConfig::default().check(), Ok(()));
        assert!(
            SanitizerConfig {
                max_chars: 0,
                ..Default::default()
            }
            .check()
            .unwrap_err()
            .contains("max_chars")
        );
        assert!(
            cfg(&["ok", "..."])
                .check()
                .unwrap_err()
                .contains("blocked_terms[1]")
        );
        assert!(cfg(&["  "]).check().is_err());
        assert_eq!(cfg(&["!!!"]).check(), Ok(()));
        let c: SanitizerConfig = serde_json::from_str(r#"{"blocked_terms":["x"]}"#).unwrap();
        assert_eq!(c, cfg(&["x"]));
        assert!(serde_json::from_str::<SanitizerConfig>(r#"{"max_char":1}"#).is_err());
        let s = Sanitized::Cleaned {
            text: "a".into(),
            changes: vec!["c".into()],
        };
        assert_eq!(
            serde_json::to_string(&s).unwrap(),
            r#"{"cleaned":{"text":"a","changes":["c"]}}"#
        );
        assert_eq!(
            serde_json::to_string(&Sanitized::Unchanged).unwrap(),
            r#""unchanged""#
        );
        let back: Sanitized = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s);
    }

    /// Deterministic fuzz: odd characters and terms never panic, and the output obeys the
    /// limits.
    #[test]
    fn fuzz_never_panics() {
        let alphabet: Vec<char> =
            "aAnudeés 1!@$|.-_*\t\n\u{200B}\u{202E}\u{0301}\u{00AD}\u{E0041}ｎ😀\u{0007}ß İ"
                .chars()
                .collect();
        let c = SanitizerConfig {
            max_chars: 40,
            blocked_terms: vec!["nude".into(), "a s".into(), "ß".into(), "İi".into()],
        };
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        for _ in 0..3000 {
            let len = (seed % 60) as usize;
            let s: String = (0..len)
                .map(|_| {
                    seed = seed
                        .wrapping_mul(6_364_136_223_846_793_005)
                        .wrapping_add(1_442_695_040_888_963_407);
                    alphabet[(seed >> 33) as usize % alphabet.len()]
                })
                .collect();
            match sanitize(&s, &c) {
                Sanitized::Unchanged => assert!(s.chars().count() <= 40),
                Sanitized::Cleaned { text, changes } => {
                    assert!(!text.is_empty() && text.chars().count() <= 40 && !changes.is_empty());
                    assert_eq!(text.trim(), text);
                    assert!(!text.contains("  ") && !text.contains('\u{200B}'));
                }
                Sanitized::Reject(e) => assert!(e.code == "empty" || e.code == "unsafe_content"),
            }
        }
    }
}
