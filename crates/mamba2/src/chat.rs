//! Conversations on a [`TextGenerator`]: a list of messages rendered with the model's chat
//! template, prefilled into a [`Session`] reusing the state it already holds when the new
//! prompt extends it, then answered.

use crate::chat_template::ChatOptions;
use crate::pipeline::{TextGenerator, TextOptions};
use crate::session::{CancelToken, GenerationSummary, Session};
use crate::{Error, Result};
use std::ops::ControlFlow;

impl TextGenerator {
    /// Renders `messages` with the model's chat template (see
    /// [`crate::chat_template::ChatTemplate::render`]). A model without a template is
    /// [`Error::ChatTemplate`].
    ///
    /// ```
    /// use mamba2::chat_template::{ChatMessage, ChatOptions, ChatTemplate};
    /// use mamba2::pipeline::{bundled_model_dir, TextGenerator};
    /// let gen = TextGenerator::load(&bundled_model_dir()?.to_string_lossy(), &Default::default())?
    ///     .with_chat_template(Some(ChatTemplate::new(
    ///         "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant:",
    ///         None,
    ///         None,
    ///     )?));
    /// let prompt = gen.apply_chat_template(&[ChatMessage::new("user", "Hi")], &ChatOptions::default())?;
    /// assert_eq!(prompt, "user: Hi\nassistant:");
    /// # Ok::<(), mamba2::Error>(())
    /// ```
    pub fn apply_chat_template<M: serde::Serialize>(
        &self,
        messages: &[M],
        opts: &ChatOptions,
    ) -> Result<String> {
        self.chat_template()
            .ok_or_else(|| {
                Error::ChatTemplate(
                    "this model has no chat template (tokenizer_config.json `chat_template`, \
                     chat_template.jinja or GGUF `tokenizer.chat_template`)"
                        .into(),
                )
            })?
            .render(messages, opts)
    }

    /// Answers a conversation: renders `messages` with the generation prompt on, makes the
    /// session hold the rendered prompt's tokens (feeding only what extends the tokens it
    /// already holds, from the last turn's prompt and reply, else starting over; see
    /// [`Session::sync_tokens`]) and generates the reply, streamed to `on_text` as
    /// [`TextGenerator::generate`] does. The reply is not added to `messages`: append it as an
    /// `assistant` message for the next turn.
    pub fn chat<M: serde::Serialize>(
        &self,
        session: &mut Session,
        messages: &[M],
        opts: &TextOptions,
        cancel: &CancelToken,
        on_text: impl FnMut(&str) -> ControlFlow<()>,
    ) -> Result<GenerationSummary> {
        let chat_opts = ChatOptions {
            add_generation_prompt: true,
            ..Default::default()
        };
        let prompt = self.apply_chat_template(messages, &chat_opts)?;
        let ids = self.encode(&prompt)?;
        session.sync_tokens(&ids)?;
        self.generate(session, "", opts, cancel, on_text)
    }
}
