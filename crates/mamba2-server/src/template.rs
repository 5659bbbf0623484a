//! Chat messages to prompt text, for models that publish no chat template (such as the bundled
//! one; a model's own template, [`mamba2::chat_template`], is used when it has one): each message becomes `Role: content` followed by a blank line, and the prompt ends
//! with `Assistant:` for the model to continue.
//!
//! The rendering is prefix-stable: the prompt of turn `n` followed by the text generated for it
//! is the start of turn `n + 1`'s prompt, which is what lets the prompt-state cache resume a
//! conversation. An assistant message is therefore written as `Assistant:` directly followed by
//! its content (the model's reply starts with its own space); a content without a leading space
//! gets one.

/// A chat message: role and text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub role: Role,
    pub content: String,
}

/// The roles this template knows (`developer` is read as `system`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    /// Parses an OpenAI role name.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "system" | "developer" => Some(Role::System),
            "user" => Some(Role::User),
            "assistant" => Some(Role::Assistant),
            _ => None,
        }
    }

    /// The OpenAI role name (`system`, `user`, `assistant`).
    pub fn name(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Role::System => "System",
            Role::User => "User",
            Role::Assistant => "Assistant",
        }
    }
}

/// Where the model's reply ends: the start of a next turn it writes itself.
pub const CHAT_STOP: &str = "\nUser:";

/// The prompt for `messages`, ending with the cue for the assistant's reply.
///
/// ```
/// use mamba2_server::template::{render_chat, Message, Role};
/// let turn1 = vec![Message { role: Role::User, content: "Hello".into() }];
/// let prompt1 = render_chat(&turn1);
/// assert_eq!(prompt1, "User: Hello\n\nAssistant:");
/// let mut turn2 = turn1.clone();
/// turn2.push(Message { role: Role::Assistant, content: " Good day.".into() });
/// turn2.push(Message { role: Role::User, content: "How are you?".into() });
/// // Turn 1's prompt plus the reply is where turn 2's prompt starts.
/// assert!(render_chat(&turn2).starts_with(&format!("{prompt1} Good day.")));
/// ```
pub fn render_chat(messages: &[Message]) -> String {
    let mut out = String::new();
    for m in messages {
        out.push_str(m.role.label());
        out.push(':');
        if m.role != Role::Assistant || !m.content.starts_with(char::is_whitespace) {
            out.push(' ');
        }
        out.push_str(&m.content);
        out.push_str("\n\n");
    }
    out.push_str("Assistant:");
    out
}
