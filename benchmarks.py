"""C-Eval and CMMLU as users download them: the subject tables, the CSV readers and the prompts that
`eval.py --ceval DIR` and `eval.py --cmmlu DIR` score (eval.py does the scoring and the report).

    python eval.py --model out/pretrain/latest --ceval ceval-exam --raw --shots 5
    python eval.py --model out/dpo/latest --cmmlu cmmlu --subjects agronomy,anatomy
    python eval.py --model out/dpo/latest --ceval ceval-exam --split test --out submission.json

Layouts, as the official archives unzip (nanozh downloads nothing: these are evaluation data and
are kept out of all training data):
  C-Eval (github.com/hkust-nlp/ceval, ceval-exam.zip): dev/ val/ test/, each holding
    <subject>_<split>.csv with the columns id, question, A, B, C, D, answer (dev adds explanation;
    test has no answer: its predictions go to C-Eval's submission JSON, eval.py --out).
  CMMLU (github.com/haonan-li/CMMLU, cmmlu_v1_0_1.zip): dev/ test/, each holding <subject>.csv with
    an unnamed index column, then Question, A, B, C, D, Answer.
Columns are found by name (case aside), so extra columns and their order do not matter.

The prompt is lm-evaluation-harness's for both benchmarks: a one-line description of the subject
in Chinese, then K solved examples (the first K dev questions of the same subject), then the
question with its four options, ending in "答案：".
"""

import csv
from dataclasses import dataclass
from pathlib import Path

from errors import user_error

LETTERS = "ABCD"
CATEGORIES = ["STEM", "社会科学", "人文", "其他"]  # as C-Eval and CMMLU report them
STEM, SOCIAL, HUMANITIES, OTHER = CATEGORIES

# subject (file name) -> (Chinese name, category), from C-Eval's subject_mapping.json (which gives
# clinical_medicine no category: C-Eval's paper puts it under Other)
CEVAL = {
    "computer_network": ("计算机网络", STEM), "operating_system": ("操作系统", STEM),
    "computer_architecture": ("计算机组成", STEM), "college_programming": ("大学编程", STEM),
    "college_physics": ("大学物理", STEM), "college_chemistry": ("大学化学", STEM),
    "advanced_mathematics": ("高等数学", STEM), "probability_and_statistics": ("概率统计", STEM),
    "discrete_mathematics": ("离散数学", STEM), "electrical_engineer": ("注册电气工程师", STEM),
    "metrology_engineer": ("注册计量师", STEM), "high_school_mathematics": ("高中数学", STEM),
    "high_school_physics": ("高中物理", STEM), "high_school_chemistry": ("高中化学", STEM),
    "high_school_biology": ("高中生物", STEM), "middle_school_mathematics": ("初中数学", STEM),
    "middle_school_biology": ("初中生物", STEM), "middle_school_physics": ("初中物理", STEM),
    "middle_school_chemistry": ("初中化学", STEM), "veterinary_medicine": ("兽医学", STEM),
    "college_economics": ("大学经济学", SOCIAL), "business_administration": ("工商管理", SOCIAL),
    "marxism": ("马克思主义基本原理", SOCIAL), "mao_zedong_thought": ("毛泽东思想和中国特色社会主义理论体系概论", SOCIAL),
    "education_science": ("教育学", SOCIAL), "teacher_qualification": ("教师资格", SOCIAL),
    "high_school_politics": ("高中政治", SOCIAL), "high_school_geography": ("高中地理", SOCIAL),
    "middle_school_politics": ("初中政治", SOCIAL), "middle_school_geography": ("初中地理", SOCIAL),
    "modern_chinese_history": ("近代史纲要", HUMANITIES),
    "ideological_and_moral_cultivation": ("思想道德修养与法律基础", HUMANITIES), "logic": ("逻辑学", HUMANITIES),
    "law": ("法学", HUMANITIES), "chinese_language_and_literature": ("中国语言文学", HUMANITIES),
    "art_studies": ("艺术学", HUMANITIES), "professional_tour_guide": ("导游资格", HUMANITIES),
    "legal_professional": ("法律职业资格", HUMANITIES), "high_school_chinese": ("高中语文", HUMANITIES),
    "high_school_history": ("高中历史", HUMANITIES), "middle_school_history": ("初中历史", HUMANITIES),
    "civil_servant": ("公务员", OTHER), "sports_science": ("体育学", OTHER), "plant_protection": ("植物保护", OTHER),
    "basic_medicine": ("基础医学", OTHER), "clinical_medicine": ("临床医学", OTHER),
    "urban_and_rural_planner": ("注册城乡规划师", OTHER), "accountant": ("注册会计师", OTHER),
    "fire_engineer": ("注册消防工程师", OTHER), "environmental_impact_assessment_engineer": ("环境影响评价工程师", OTHER),
    "tax_accountant": ("税务师", OTHER), "physician": ("医师资格", OTHER),
}

# from CMMLU's src/categories.py: each subject's subcategory decides its category ("China specific"
# is a second grouping across these four, left out here)
CMMLU = {
    "agronomy": ("农学", OTHER), "anatomy": ("解剖学", STEM), "ancient_chinese": ("古汉语", SOCIAL),
    "arts": ("艺术学", HUMANITIES), "astronomy": ("天文学", STEM), "business_ethics": ("商业伦理", SOCIAL),
    "chinese_civil_service_exam": ("中国公务员考试", SOCIAL), "chinese_driving_rule": ("中国驾驶规则", OTHER),
    "chinese_food_culture": ("中国饮食文化", SOCIAL), "chinese_foreign_policy": ("中国外交政策", SOCIAL),
    "chinese_history": ("中国历史", HUMANITIES), "chinese_literature": ("中国文学", HUMANITIES),
    "chinese_teacher_qualification": ("中国教师资格", SOCIAL), "clinical_knowledge": ("临床知识", OTHER),
    "college_actuarial_science": ("大学精算学", STEM), "college_education": ("大学教育学", SOCIAL),
    "college_engineering_hydrology": ("大学工程水文学", STEM), "college_law": ("大学法律", HUMANITIES),
    "college_mathematics": ("大学数学", STEM), "college_medical_statistics": ("大学医学统计", STEM),
    "college_medicine": ("大学医学", OTHER), "computer_science": ("计算机科学", STEM),
    "computer_security": ("计算机安全", OTHER), "conceptual_physics": ("概念物理学", STEM),
    "construction_project_management": ("建设工程管理", OTHER), "economics": ("经济学", SOCIAL),
    "education": ("教育学", SOCIAL), "electrical_engineering": ("电气工程", STEM),
    "elementary_chinese": ("小学语文", SOCIAL), "elementary_commonsense": ("小学常识", OTHER),
    "elementary_information_and_technology": ("小学信息技术", OTHER), "elementary_mathematics": ("初等数学", STEM),
    "ethnology": ("民族学", SOCIAL), "food_science": ("食品科学", OTHER), "genetics": ("遗传学", STEM),
    "global_facts": ("全球事实", HUMANITIES), "high_school_biology": ("高中生物", STEM),
    "high_school_chemistry": ("高中化学", STEM), "high_school_geography": ("高中地理", SOCIAL),
    "high_school_mathematics": ("高中数学", STEM), "high_school_physics": ("高中物理学", STEM),
    "high_school_politics": ("高中政治", SOCIAL), "human_sexuality": ("人类性行为", OTHER),
    "international_law": ("国际法学", HUMANITIES), "journalism": ("新闻学", SOCIAL),
    "jurisprudence": ("法理学", HUMANITIES), "legal_and_moral_basis": ("法律与道德基础", OTHER),
    "logical": ("逻辑学", HUMANITIES), "machine_learning": ("机器学习", STEM), "management": ("管理学", SOCIAL),
    "marketing": ("市场营销", SOCIAL), "marxist_theory": ("马克思主义理论", HUMANITIES),
    "modern_chinese": ("现代汉语", SOCIAL), "nutrition": ("营养学", OTHER), "philosophy": ("哲学", HUMANITIES),
    "professional_accounting": ("专业会计", SOCIAL), "professional_law": ("专业法学", HUMANITIES),
    "professional_medicine": ("专业医学", OTHER), "professional_psychology": ("专业心理学", SOCIAL),
    "public_relations": ("公共关系", SOCIAL), "security_study": ("安全研究", SOCIAL), "sociology": ("社会学", SOCIAL),
    "sports_science": ("体育学", OTHER), "traditional_chinese_medicine": ("中医中药", OTHER),
    "virology": ("病毒学", STEM), "world_history": ("世界历史", HUMANITIES), "world_religions": ("世界宗教", HUMANITIES),
}

BENCHMARKS = {  # name -> (subject table, splits, default split, the harness's description of a subject)
    "ceval": (CEVAL, ("dev", "val", "test"), "val", "以下是中国关于{}考试的单项选择题，请选出其中的正确答案。\n\n"),
    "cmmlu": (CMMLU, ("dev", "test"), "test", "以下是关于{}的单项选择题，请直接给出正确答案的选项。\n\n"),
}


@dataclass
class Question:
    subject: str
    where: str  # file:line, for messages
    id: str  # C-Eval's id column (the key of its submission JSON); CMMLU's index column
    question: str
    choices: list[str]
    answer: int | None  # index into choices; None in a split without answers (C-Eval test)


def subject_info(benchmark: str, subject: str) -> tuple[str, str]:
    """(Chinese name, category); a subject the tables do not know keeps its file name, under 其他."""
    return BENCHMARKS[benchmark][0].get(subject, (subject.replace("_", " "), OTHER))


def _csv_path(root: Path, benchmark: str, split: str, subject: str) -> Path:
    return root / split / (f"{subject}_{split}.csv" if benchmark == "ceval" else f"{subject}.csv")


def _subjects_in(root: Path, benchmark: str, split: str) -> list[str]:
    folder = root / split
    if not folder.is_dir():
        raise user_error(str(root), f"no {split}/ folder",
                         f"pass the folder the official {benchmark} archive unzips to, holding "
                         f"{'/ '.join(BENCHMARKS[benchmark][1])}/")
    suffix = f"_{split}.csv" if benchmark == "ceval" else ".csv"
    return sorted(p.name[: -len(suffix)] for p in folder.iterdir() if p.name.endswith(suffix))


def read_csv(path: Path, subject: str, need_answers: bool = True) -> list[Question]:
    """The questions of one subject file; a missing column, a short row, an empty question or option
    or an answer that is not one of A-D is a file:line error (line of the row's first line)."""
    try:
        f = open(path, encoding="utf-8-sig", newline="")  # the official files start with a BOM
    except OSError as e:
        raise user_error(str(path), f"cannot read ({e.strerror})", "check the path") from None
    with f:
        reader = csv.reader(f)
        try:
            header = [h.strip().lower() for h in next(reader, [])]
            cols = {name: header.index(name) for name in ["question", *LETTERS.lower(), "answer", "id"]
                    if name in header}
            missing = [c for c in ["question", *LETTERS.lower()] if c not in cols]
            if missing or (need_answers and "answer" not in cols):
                raise user_error(str(path), f"no column {', '.join(missing) or 'answer'} in the header "
                                 f"({', '.join(header) or 'empty file'})", "a C-Eval or CMMLU CSV file", line=1)
            questions = []
            while True:
                line = reader.line_num + 1
                row = next(reader, None)
                if row is None:
                    break
                if not any(cell.strip() for cell in row):
                    continue
                if len(row) != len(header):
                    raise user_error(str(path), f"{len(row)} fields, the header has {len(header)}",
                                     "quote fields that hold commas", line=line)
                choices = [row[cols[c]].strip() for c in LETTERS.lower()]
                question = row[cols["question"]].strip()
                if not question or not all(choices):
                    raise user_error(str(path), "empty question or option", "fill it in or remove the row", line=line)
                answer = None
                if "answer" in cols:
                    letter = row[cols["answer"]].strip().upper()
                    if len(letter) != 1 or letter not in LETTERS:  # one letter: "" and "AB" are in "ABCD" too
                        raise user_error(str(path), f"answer {row[cols['answer']]!r} is not one of A, B, C, D",
                                         "one letter", line=line)
                    answer = LETTERS.index(letter)
                qid = row[cols["id"]] if "id" in cols else (row[0] if header[0] == "" else str(len(questions)))
                questions.append(Question(subject, f"{path}:{line}", qid.strip(), question, choices, answer))
        except csv.Error as e:
            raise user_error(str(path), f"malformed CSV ({e})", "fix the quoting", line=reader.line_num) from None
    if not questions:
        raise user_error(str(path), "no questions in file", "a header line, then one question per row")
    return questions


def read_benchmark(benchmark: str, root: str, split: str, subjects: list[str], shots: int
                   ) -> tuple[list[Question], dict[str, list[Question]]]:
    """The questions of `split` (every subject, or only `subjects`) and, with shots > 0, the first
    `shots` dev questions of each subject (all K, or a one-line error)."""
    _, splits, _, _ = BENCHMARKS[benchmark]
    if split not in splits:
        raise user_error("--split", f"{benchmark} has no split {split!r}", f"one of {', '.join(splits)}")
    if shots and split == "dev":
        raise user_error("--shots", "the examples come from the dev split being evaluated", "--shots 0, or another split")
    path = Path(root)
    have = _subjects_in(path, benchmark, split)
    unknown = [s for s in subjects if s not in have]
    if unknown:
        raise user_error(f"{path / split}", f"no subject {', '.join(unknown)}",
                         f"have: {', '.join(have[:8])}{' ...' if len(have) > 8 else ''}")
    chosen = subjects or have
    if not chosen:
        raise user_error(f"{path / split}", "no subject files", f"{_csv_path(path, benchmark, split, '<subject>').name}")
    need_answers = not (benchmark == "ceval" and split == "test")  # C-Eval keeps its test answers
    questions = [q for s in chosen for q in read_csv(_csv_path(path, benchmark, split, s), s, need_answers)]
    dev = {}
    for s in (chosen if shots else []):
        examples = read_csv(_csv_path(path, benchmark, "dev", s), s)[:shots]
        if len(examples) < shots:
            raise user_error(str(_csv_path(path, benchmark, "dev", s)), f"{len(examples)} questions, --shots {shots} "
                             "needs that many", f"--shots {len(examples)}")
        dev[s] = examples
    return questions, dev


def _shown(q: Question) -> str:
    return f"{q.question}\n" + "".join(f"{L}. {c}\n" for L, c in zip(LETTERS, q.choices)) + "答案："


def prompt(benchmark: str, q: Question, shots: list[Question], by_text: bool) -> tuple[str, list[str]]:
    """The text before the answer, and the four answers to score after it: the letters, or with
    by_text the options' own text (the solved examples then end in their answer's text too, so the
    model sees the format it is scored in)."""
    answers = (lambda x: x.choices) if by_text else (lambda x: list(LETTERS))
    head = BENCHMARKS[benchmark][3].format(subject_info(benchmark, q.subject)[0])
    head += "".join(_shown(s) + answers(s)[s.answer] + "\n\n" for s in shots)
    return head + _shown(q), answers(q)


def parse_subjects(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()] if text else []

