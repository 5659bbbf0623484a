//! The server through the `async-openai` client: model list, chat and text completions,
//! streaming and not, usage counts, stop strings, seeds; and the wire format of a stream as
//! raw Server-Sent Events.

mod support;
use async_openai::types::chat::{
    ChatCompletionRequestMessage, ChatCompletionRequestUserMessageArgs,
    ChatCompletionStreamOptions, CreateChatCompletionRequest, CreateChatCompletionRequestArgs,
    FinishReason, StopConfiguration,
};
use async_openai::types::completions::{CreateCompletionRequest, CreateCompletionRequestArgs};
use futures_util::StreamExt;
use mamba2_server::template::{render_chat, Message, Role};
use support::{generator, TestServer, MODEL};

fn user(text: &str) -> ChatCompletionRequestMessage {
    ChatCompletionRequestUserMessageArgs::default()
        .content(text)
        .build()
        .unwrap()
        .into()
}

fn chat_request(text: &str, max_tokens: u32, stream: bool) -> CreateChatCompletionRequest {
    let mut r = CreateChatCompletionRequestArgs::default()
        .model(MODEL)
        .messages(vec![user(text)])
        .max_completion_tokens(max_tokens)
        .temperature(0.0)
        .build()
        .unwrap();
    if stream {
        r.stream = Some(true);
        r.stream_options = Some(ChatCompletionStreamOptions {
            include_usage: Some(true),
            include_obfuscation: None,
        });
    }
    r
}

fn completion_request(prompt: &str, max_tokens: u32) -> CreateCompletionRequest {
    CreateCompletionRequestArgs::default()
        .model(MODEL)
        .prompt(prompt)
        .max_tokens(max_tokens)
        .temperature(0.0)
        .build()
        .unwrap()
}

/// Greedy continuation of `prompt` by the library alone (no server), for comparison.
fn library_greedy(prompt: &str, max_tokens: usize) -> String {
    let g = generator();
    let mut session = g.new_session().unwrap();
    let opts = mamba2::pipeline::TextOptions {
        max_new_tokens: max_tokens,
        ..Default::default()
    };
    let mut out = String::new();
    g.generate(
        &mut session,
        prompt,
        &opts,
        &mamba2::session::CancelToken::new(),
        |t| {
            out.push_str(t);
            std::ops::ControlFlow::Continue(())
        },
    )
    .unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_and_health() {
    let server = TestServer::default().await;
    let list = server.client().models().list().await.unwrap();
    assert_eq!(list.data.len(), 1);
    assert_eq!(list.data[0].id, MODEL);
    let h = server.health().await;
    assert_eq!(h["status"], "ok");
    assert_eq!(h["active"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_match_the_library_streamed_or_not() {
    let server = TestServer::default().await;
    let client = server.client();
    let prompt = "It is a truth universally acknowledged";
    let expected = library_greedy(prompt, 12);
    assert!(!expected.is_empty());

    let r = client
        .completions()
        .create(completion_request(prompt, 12))
        .await
        .unwrap();
    assert_eq!(r.object, "text_completion");
    assert_eq!(r.choices[0].text, expected);
    let usage = r.usage.unwrap();
    let prompt_tokens = generator().encode(prompt).unwrap().len() as u32;
    assert_eq!(usage.prompt_tokens, prompt_tokens);
    assert_eq!(usage.completion_tokens, 12);
    assert_eq!(usage.total_tokens, prompt_tokens + 12);

    let mut req = completion_request(prompt, 12);
    req.stream = Some(true);
    let mut stream = client.completions().create_stream(req).await.unwrap();
    let (mut text, mut finish, mut chunks) = (String::new(), None, 0);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        chunks += 1;
        assert_eq!(chunk.object, "text_completion");
        for c in chunk.choices {
            text.push_str(&c.text);
            if c.finish_reason.is_some() {
                finish = c.finish_reason;
            }
        }
    }
    assert_eq!(text, expected);
    assert!(
        chunks >= 3,
        "{chunks} chunks: tokens were not streamed one by one"
    );
    assert_eq!(
        format!("{finish:?}"),
        "Some(Length)",
        "finish reason of a max_tokens stop"
    );

    // Token-id prompts are accepted too.
    let ids = generator().encode(prompt).unwrap();
    let mut req = completion_request(prompt, 12);
    req.prompt = async_openai::types::chat::Prompt::IntegerArray(ids);
    let r = client.completions().create(req).await.unwrap();
    assert_eq!(r.choices[0].text, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_streamed_equals_chat_whole() {
    let server = TestServer::default().await;
    let client = server.client();
    let question = "What did Elizabeth say to Mr. Darcy?";
    let whole = client
        .chat()
        .create(chat_request(question, 10, false))
        .await
        .unwrap();
    assert_eq!(whole.object, "chat.completion");
    let content = whole.choices[0].message.content.clone().unwrap();
    let prompt = render_chat(&[Message {
        role: Role::User,
        content: question.into(),
    }]);
    assert_eq!(
        content,
        library_greedy(&prompt, 10).split("\nUser:").next().unwrap()
    );
    let usage = whole.usage.clone().unwrap();
    assert_eq!(
        usage.prompt_tokens as usize,
        generator().encode(&prompt).unwrap().len()
    );

    let mut stream = client
        .chat()
        .create_stream(chat_request(question, 10, true))
        .await
        .unwrap();
    let (mut text, mut finish, mut usage_seen, mut first_role) = (String::new(), None, None, None);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        assert_eq!(chunk.object, "chat.completion.chunk");
        assert_eq!(chunk.model, MODEL);
        if let Some(u) = chunk.usage {
            assert!(chunk.choices.is_empty(), "the usage chunk has no choices");
            usage_seen = Some(u);
        }
        for c in chunk.choices {
            if first_role.is_none() {
                first_role = Some(c.delta.role);
            }
            text.push_str(c.delta.content.as_deref().unwrap_or(""));
            if c.finish_reason.is_some() {
                finish = c.finish_reason;
            }
        }
    }
    assert_eq!(text, content);
    assert!(matches!(
        first_role,
        Some(Some(async_openai::types::chat::Role::Assistant))
    ));
    assert_eq!(finish, Some(whole_finish(&whole)));
    let u = usage_seen.expect("include_usage asks for a usage chunk");
    assert_eq!(u.prompt_tokens, usage.prompt_tokens);
    assert_eq!(u.completion_tokens, usage.completion_tokens);
}

fn whole_finish(r: &async_openai::types::chat::CreateChatCompletionResponse) -> FinishReason {
    r.choices[0].finish_reason.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_strings_seeds_and_temperature() {
    let server = TestServer::default().await;
    let client = server.client();
    let prompt = "The old man said";
    let free = library_greedy(prompt, 24);
    // Stop at the second word of the greedy continuation: the text ends before it.
    let word = free
        .split_whitespace()
        .nth(1)
        .expect("two words")
        .to_string();
    let mut req = completion_request(prompt, 24);
    req.stop = Some(StopConfiguration::String(word.clone()));
    let r = client.completions().create(req).await.unwrap();
    let cut = &free[..free.find(&word).unwrap()];
    assert_eq!(r.choices[0].text, cut);
    assert_eq!(format!("{:?}", r.choices[0].finish_reason), "Some(Stop)");

    // Sampling: the same seed gives the same text; it is a real draw (temperature 1.5 over
    // several seeds gives more than one text).
    let sampled = |seed: i64| {
        let mut req = completion_request(prompt, 16);
        req.temperature = Some(1.5);
        req.top_p = Some(0.95);
        req.seed = Some(seed);
        let client = client.clone();
        async move {
            client.completions().create(req).await.unwrap().choices[0]
                .text
                .clone()
        }
    };
    assert_eq!(sampled(7).await, sampled(7).await);
    let mut texts = std::collections::HashSet::new();
    for seed in 0..4 {
        texts.insert(sampled(seed).await);
    }
    assert!(texts.len() > 1, "four seeds gave one text: {texts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_models_chat_template_renders_the_prompt() {
    let source = "{% for m in messages %}<{{ m.role }}> {{ m.content }}\n{% endfor %}\
                  {% if add_generation_prompt %}<assistant>{% endif %}";
    let template = mamba2::chat_template::ChatTemplate::new(source, None, None).unwrap();
    let templated = generator().with_chat_template(Some(template));
    let server = mamba2_server::Server::new(
        templated,
        mamba2_server::routes::HttpConfig::new(MODEL),
        Default::default(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}/v1", listener.local_addr().unwrap());
    tokio::spawn(server.serve(listener, std::future::pending()));
    let client = async_openai::Client::with_config(
        async_openai::config::OpenAIConfig::new().with_api_base(base),
    );
    let r = client
        .chat()
        .create(chat_request("Where is Pemberley?", 8, false))
        .await
        .unwrap();
    let rendered = "<user> Where is Pemberley?\n<assistant>";
    assert_eq!(
        r.usage.unwrap().prompt_tokens as usize,
        generator().encode(rendered).unwrap().len()
    );
    assert_eq!(
        r.choices[0].message.content.as_deref().unwrap(),
        library_greedy(rendered, 8)
    );
}
