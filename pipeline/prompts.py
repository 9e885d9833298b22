"""The prompts of the VLAA-Thinking data pipeline (pipeline/steps.py), all in one place.

The paper names the models of each step (GPT-4o captions, DeepSeek-R1 distils, an LLM rewrites and judges) but
does not print its prompts; these are written for vlaa-min from the paper's description of each step:

    caption   a vision model describes the image in enough detail to answer questions without seeing it
    distill   a text-only reasoner gets caption + question and answers AS IF it saw the image, never naming the
              caption; reasoning in <think> </think>, the final answer in <answer> </answer>
    rewrite   an LLM removes leftover mentions of a caption / description / rationale and changes nothing else
    verify    an LLM judge says Yes or No: does the answer match the ground truth?

Each step's prompt is a (system, user) pair; the user text is a str.format template. The distill step has no
system prompt: DeepSeek recommends putting every instruction for R1 in the user turn.
Placeholders: {caption} {question} (distill), {response} (rewrite), {question} {gt} {answer} (verify).
"""

# Words whose mention betrays that the reasoner read text instead of seeing the image (step 4 removes them;
# lower-cased substring match, so "captions" and "Description" count too).
MENTION_WORDS = ("caption", "description", "rationale")

CAPTION_SYSTEM = (
    "You are an expert annotator. You describe images precisely and completely for a reader who cannot see them."
)

CAPTION_USER = (
    "Describe this image in detail. Cover every object with its attributes (colour, shape, size, count), where it "
    "is and how it relates to the others; copy all text, numbers, labels, axes, legends and table values exactly "
    "as written; for diagrams and geometric figures, name the labelled points, lines, lengths and angles. Say only "
    "what is visible: do not guess, and do not answer any question about the image. Write plain prose without a "
    "preamble."
)

DISTILL_SYSTEM = None

DISTILL_USER = (
    "Answer a question about an image. You cannot see the image, but the text below describes it faithfully and "
    "completely.\n\n"
    "What the image shows:\n{caption}\n\n"
    "Question: {question}\n\n"
    "Answer as if you were looking at the image yourself: refer to \"the image\" and to what you see in it, and "
    "never mention a caption, a description or that the image was described to you. Think it through step by step "
    "inside <think> </think>, then give only the final answer inside <answer> </answer> (for a multiple-choice "
    "question, the option letter)."
)

REWRITE_SYSTEM = "You are a careful copy editor. You change only what you are asked to change."

REWRITE_USER = (
    "The text below was written by someone who read a description of an image instead of looking at it. Rewrite "
    "it so that it reads as if the writer had looked at the image: every reference to a caption, a description or "
    "a rationale (for example \"the caption says\", \"according to the description\", \"the rationale mentions\") "
    "becomes a reference to the image, or is removed. Change nothing else: keep every reasoning step, number and "
    "the final answer, keep the <think> </think> and <answer> </answer> tags where they are, and add nothing new. "
    "Reply with the rewritten text only.\n\n"
    "Text:\n{response}"
)

VERIFY_SYSTEM = "You are a strict and fair grader."

VERIFY_USER = (
    "Decide whether a model's answer to a question is correct, given the ground-truth answer. They match when they "
    "mean the same thing: the same number or an equivalent expression in any form, the same option (letter or "
    "option text), the same box up to rounding, or the same facts in other words. Ignore formatting and extra "
    "explanation.\n\n"
    "Question: {question}\n"
    "Ground truth: {gt}\n"
    "Model's answer: {answer}\n\n"
    "Reply with exactly one word: Yes or No."
)
