//! `hello`: the example Ferry function.
//!
//! Input `{"name":"ada"}` → output `{"greeting":"Hello, ada!"}`. Without a name it
//! greets the world; input that is not a JSON object is a function error.

use serde_json::{Map, Value, json};

const NOT_AN_OBJECT: &str = "input must be a JSON object like {\"name\":\"ada\"}";

/// The greeting for one request body.
pub fn greet(input: &[u8]) -> Result<Vec<u8>, String> {
    let input: Map<String, Value> =
        serde_json::from_slice(input).map_err(|_| NOT_AN_OBJECT.to_string())?;
    let name = match input.get("name") {
        None | Some(Value::Null) => "world",
        Some(Value::String(name)) => name.as_str(),
        Some(_) => return Err("\"name\" must be a string".to_string()),
    };
    eprintln!("hello: greeting {name:?}");
    serde_json::to_vec(&json!({ "greeting": format!("Hello, {name}!") })).map_err(|e| e.to_string())
}

struct Hello;

impl ferry_sdk::guest::Function for Hello {
    fn handle(input: Vec<u8>) -> Result<Vec<u8>, String> {
        greet(&input)
    }
}

ferry_sdk::export!(Hello);

#[cfg(test)]
mod tests {
    use super::greet;

    #[test]
    fn greets() {
        assert_eq!(
            greet(br#"{"name":"ada"}"#).unwrap(),
            br#"{"greeting":"Hello, ada!"}"#
        );
        assert_eq!(greet(b"{}").unwrap(), br#"{"greeting":"Hello, world!"}"#);
        assert!(greet(b"ada").unwrap_err().contains("JSON object"));
    }
}
