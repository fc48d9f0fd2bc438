// The Vercel AI SDK against a running sidecar, as an app would use it: @ai-sdk/openai-compatible
// (chat completions), and @ai-sdk/openai's default provider, which speaks the Responses API
// (the responses-* cases). Run by tests/e2e/test_clients_e2e.py:
//
//   node vercel.mjs BASE_URL MODEL CASE
//
// CASE is one of tool-loop, stream-tool, object, output-object, responses-tool-loop,
// responses-stream-tool, responses-object. Prints one JSON object with what the SDK returned;
// the test asserts on it. Errors print {"error": ...} and exit 1.
import { createOpenAI } from "@ai-sdk/openai";
import { createOpenAICompatible } from "@ai-sdk/openai-compatible";
import { generateObject, generateText, Output, stepCountIs, streamText, tool } from "ai";
import { z } from "zod";

const [baseURL, modelName, which] = process.argv.slice(2);
const sidecar = createOpenAICompatible({
  name: "sidecar",
  baseURL: `${baseURL}/v1`,
  apiKey: "unused",
  supportsStructuredOutputs: true,
});
const responses = which.startsWith("responses-");
// createOpenAI(...)(name) is the default provider: it calls POST /v1/responses.
const model = responses
  ? createOpenAI({ baseURL: `${baseURL}/v1`, apiKey: "unused" })(modelName)
  : sidecar.chatModel(modelName);
const settings = { model, temperature: 0, maxOutputTokens: 120, maxRetries: 0 };

const getWeather = tool({
  description: "The weather in a city now.",
  inputSchema: z.object({ city: z.string() }),
  execute: async ({ city }) => ({ city, weather: "Sunny, 21 C" }),
});
const ask = "What is the weather in Paris?";
// The first step must call the tool (a 135M model would not always choose to), the second
// answers in text from the result: the usual agent loop, pinned per step.
const pinned = ({ stepNumber }) => ({ toolChoice: stepNumber === 0 ? "required" : "none" });

function steps(result) {
  return result.steps.map((s) => ({
    finishReason: s.finishReason,
    text: s.text,
    toolCalls: s.toolCalls.map((c) => ({ id: c.toolCallId, name: c.toolName, input: c.input })),
    toolResults: s.toolResults.map((r) => ({ id: r.toolCallId, output: r.output })),
  }));
}

const Person = z.object({ name: z.string(), age: z.number().int(), tags: z.array(z.string()).max(3) });

const cases = {
  "tool-loop": async () => {
    const result = await generateText({
      ...settings, tools: { get_weather: getWeather }, prompt: ask,
      stopWhen: stepCountIs(2), prepareStep: pinned,
    });
    return { text: result.text, steps: steps(result), usage: result.totalUsage };
  },
  "stream-tool": async () => {
    const result = streamText({
      ...settings, tools: { get_weather: getWeather }, prompt: ask,
      stopWhen: stepCountIs(2), prepareStep: pinned,
    });
    const parts = [];
    let inputDeltas = "";
    for await (const part of result.fullStream) {
      parts.push(part.type);
      if (part.type === "tool-input-delta") inputDeltas += part.delta;
      if (part.type === "error") throw part.error;
    }
    return { parts, inputDeltas, text: await result.text, steps: steps({ steps: await result.steps }) };
  },
  object: async () => {
    const result = await generateObject({
      ...settings, schema: Person, schemaName: "person",
      prompt: "Describe a person called Ada.",
    });
    return { object: result.object, finishReason: result.finishReason };
  },
  "output-object": async () => {
    const result = await generateText({
      ...settings, output: Output.object({ schema: Person }),
      prompt: "Describe a person called Ada.",
    });
    return { object: result.output, finishReason: result.finishReason };
  },
};
cases["responses-tool-loop"] = cases["tool-loop"];
cases["responses-stream-tool"] = cases["stream-tool"];
cases["responses-object"] = cases.object;

try {
  if (!(which in cases)) throw new Error(`unknown case ${which}`);
  console.log(JSON.stringify(await cases[which]()));
} catch (error) {
  console.log(JSON.stringify({ error: String(error), cause: String(error?.cause ?? "") }));
  process.exit(1);
}
