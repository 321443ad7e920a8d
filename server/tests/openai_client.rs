//! `arbor serve` driven by a real OpenAI client library (`async-openai`) over loopback.

mod common;

use async_openai::Client;
use async_openai::config::OpenAIConfig;
use async_openai::types::chat::{
    ChatCompletionRequestUserMessageArgs, ChatCompletionStreamOptions, CreateChatCompletionRequest,
    CreateChatCompletionRequestArgs, FinishReason, Role, StopConfiguration,
};
use async_openai::types::completions::CreateCompletionRequestArgs;
use futures_util::StreamExt;

use arbor_server::drafts::DraftSpec;
use arbor_server::http::ServeConfig;
use common::{model_name, smollm2, start};

fn client(base: &str) -> Client<OpenAIConfig> {
    Client::with_config(
        OpenAIConfig::new()
            .with_api_base(format!("{base}/v1"))
            .with_api_key("unused"),
    )
}

fn chat_request(
    text: &str,
    max: u32,
    temperature: f32,
    seed: Option<i64>,
) -> CreateChatCompletionRequest {
    let mut b = CreateChatCompletionRequestArgs::default();
    b.model(model_name())
        .messages([ChatCompletionRequestUserMessageArgs::default()
            .content(text)
            .build()
            .unwrap()
            .into()])
        .max_completion_tokens(max)
        .temperature(temperature);
    if let Some(s) = seed {
        b.seed(s);
    }
    b.build().unwrap()
}

/// Chat (plain and streamed), completions (plain and streamed), stop strings, usage and
/// seeds, all through the client library; streamed text equals the non-streamed text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_client_round_trips() {
    let mut config = ServeConfig::new(smollm2());
    config.drafts = vec![DraftSpec::Ngram(4)];
    // A fixed tree: `auto` plans from measured step times, and a different tree consumes
    // the sampler's randomness differently (same distribution, another sample), so seeds
    // reproduce only under a fixed plan (seen failing under a loaded CI machine).
    config.tree = "chain:3".parse().unwrap();
    let server = start(config).await;
    let c = client(&server.base);

    // Non-streaming chat, greedy.
    let resp = c
        .chat()
        .create(chat_request("Name three colors.", 16, 0.0, None))
        .await
        .unwrap();
    assert_eq!(resp.object, "chat.completion");
    assert_eq!(resp.model, "SmolLM2-135M-Instruct.Q4_1.gguf");
    let choice = &resp.choices[0];
    assert_eq!(choice.message.role, Role::Assistant);
    let full = choice.message.content.clone().unwrap();
    assert!(!full.is_empty());
    let usage = resp.usage.unwrap();
    assert!(usage.prompt_tokens > 5);
    assert!(usage.completion_tokens <= 16 && usage.completion_tokens > 0);
    assert_eq!(
        usage.total_tokens,
        usage.prompt_tokens + usage.completion_tokens
    );
    if usage.completion_tokens == 16 {
        assert_eq!(choice.finish_reason, Some(FinishReason::Length));
    }

    // The same request streamed: role first, same id on every chunk, same text, usage last.
    let mut req = chat_request("Name three colors.", 16, 0.0, None);
    req.stream_options = Some(ChatCompletionStreamOptions {
        include_usage: Some(true),
        include_obfuscation: None,
    });
    let mut stream = c.chat().create_stream(req).await.unwrap();
    let mut text = String::new();
    let mut ids = std::collections::BTreeSet::new();
    let mut first = true;
    let mut finish = None;
    let mut stream_usage = None;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        assert_eq!(chunk.object, "chat.completion.chunk");
        ids.insert(chunk.id.clone());
        if let Some(u) = chunk.usage {
            assert!(chunk.choices.is_empty(), "the usage chunk has no choices");
            stream_usage = Some(u);
            continue;
        }
        let ch = &chunk.choices[0];
        if first {
            assert_eq!(ch.delta.role, Some(Role::Assistant));
            first = false;
        }
        if let Some(t) = &ch.delta.content {
            text.push_str(t);
        }
        if ch.finish_reason.is_some() {
            finish = ch.finish_reason;
        }
    }
    assert_eq!(ids.len(), 1);
    assert_eq!(text, full, "streamed and non-streamed greedy text differ");
    assert_eq!(finish, choice.finish_reason);
    assert_eq!(
        stream_usage.unwrap().completion_tokens,
        usage.completion_tokens
    );

    // A stop string: generation ends before it, reason "stop", and it is not in the text.
    let cut: String = full.chars().skip(4).take(3).collect();
    if !cut.trim().is_empty() {
        let mut req = chat_request("Name three colors.", 16, 0.0, None);
        req.stop = Some(StopConfiguration::String(cut.clone()));
        let r = c.chat().create(req).await.unwrap();
        let t = r.choices[0].message.content.clone().unwrap();
        assert_eq!(r.choices[0].finish_reason, Some(FinishReason::Stop));
        assert!(
            full.starts_with(&t) && !t.contains(&cut),
            "{t:?} vs {full:?} / {cut:?}"
        );
    }

    // Seeds: the same seed reproduces a sampled answer.
    let sampled = |seed| {
        let c = c.clone();
        async move {
            let r = c
                .chat()
                .create(chat_request("Tell me a story.", 24, 1.0, Some(seed)))
                .await
                .unwrap();
            r.choices[0].message.content.clone().unwrap()
        }
    };
    let (a, b, other) = (sampled(7).await, sampled(7).await, sampled(8).await);
    assert_eq!(a, b, "same seed, different text");
    let _ = other; // a different seed may or may not differ on 24 tokens; not asserted

    // Legacy completions, plain and streamed.
    let req = CreateCompletionRequestArgs::default()
        .model(model_name())
        .prompt("The capital of France is")
        .max_tokens(8u32)
        .temperature(0.0)
        .build()
        .unwrap();
    let r = c.completions().create(req.clone()).await.unwrap();
    assert_eq!(r.object, "text_completion");
    let whole = r.choices[0].text.clone();
    let mut s = c.completions().create_stream(req).await.unwrap();
    let mut streamed = String::new();
    while let Some(chunk) = s.next().await {
        for ch in chunk.unwrap().choices {
            streamed.push_str(&ch.text);
        }
    }
    assert_eq!(streamed, whole);

    // Model listing.
    let models = c.models().list().await.unwrap();
    assert!(models.data.iter().any(|m| m.id == model_name()));
    server.stop().await;
}
