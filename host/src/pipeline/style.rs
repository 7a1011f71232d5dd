//! Headshot styles: named prompt templates with a `{subject}` placeholder.

use std::collections::BTreeMap;

use super::error::GenerateError;

/// Applies the named style to `subject`, or returns the subject unchanged when `style` is
/// `None`. An unknown style is an error that lists the ones available.
pub fn apply_style(
    styles: &BTreeMap<String, String>,
    style: Option<&str>,
    subject: &str,
) -> Result<String, GenerateError> {
    let Some(name) = style else {
        return Ok(subject.to_string());
    };
    match styles.get(name) {
        Some(template) => Ok(template.replace("{subject}", subject.trim())),
        None => Err(GenerateError::InvalidParam {
            field: "style",
            message: format!(
                "unknown style `{name}`; available: {}",
                styles.keys().cloned().collect::<Vec<_>>().join(", ")
            ),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn substitutes_and_refuses_unknown() {
        let mut s = BTreeMap::new();
        s.insert(
            "studio".to_string(),
            "studio photo of {subject}, dark".to_string(),
        );
        assert_eq!(
            apply_style(&s, Some("studio"), " a cat ").unwrap(),
            "studio photo of a cat, dark"
        );
        assert_eq!(apply_style(&s, None, "a cat").unwrap(), "a cat");
        let e = apply_style(&s, Some("noir"), "x").unwrap_err().to_string();
        assert!(e.starts_with("style:") && e.contains("studio"), "{e}");
    }
}
