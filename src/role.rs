//! The roles of a conversation's turns, as every layer names them (a leaf: the wire formats,
//! the emulation, replay and the browser tiers all use it, so it depends on none of them).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    Developer,
    User,
    Assistant,
    Tool,
    Function,
}

impl Role {
    pub fn label(self) -> &'static str {
        match self {
            Role::System | Role::Developer => "System",
            Role::User => "User",
            Role::Assistant => "Assistant",
            Role::Tool | Role::Function => "Tool",
        }
    }
}
