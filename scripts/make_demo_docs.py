"""Build the PDF and DOCX documents of the ragtune demo knowledge base.

Usage (from the repository root):

    .venv/bin/python scripts/make_demo_docs.py [OUTPUT_DIR]

OUTPUT_DIR defaults to ``data/demo``. The script writes:

* ``<OUTPUT_DIR>/handbooks/renal-dosing-handbook.pdf`` -- a 3-page PDF, one topic per page,
  so answers can be checked against page numbers (built with fpdf2, core Helvetica font).
* ``<OUTPUT_DIR>/handbooks/anticoagulation-protocol.docx`` -- a Word document that uses the
  Heading 1 / Heading 2 styles (built with python-docx).

All text is defined in this file and is fictional: Northwind Valley Health is an invented
hospital network, and Hemarovin and Antarovin are invented drugs. Nothing here is medical advice.

Metadata dates are fixed and the DOCX zip entries get a fixed timestamp, so re-running the
script produces byte-identical files.
"""

from __future__ import annotations

import io
import sys
import zipfile
from datetime import datetime, timezone
from pathlib import Path

FIXED_DATE = datetime(2026, 1, 1, tzinfo=timezone.utc)
NOTICE = (
    "Fictional demo content. Northwind Valley Health (NVH) is a fictional hospital network. "
    "This document was written to test the ragtune chatbot and is not medical advice."
)

# --------------------------------------------------------------------------------------------
# PDF: Renal dosing handbook. One page per topic. ASCII only (core Helvetica font).
# Each page is (title, [paragraphs]); a paragraph starting with "- " is drawn as a bullet.
# --------------------------------------------------------------------------------------------
PDF_TITLE = "NVH Renal Dosing Handbook"
PDF_PAGES: list[tuple[str, list[str]]] = [
    (
        "Page 1. Estimating kidney function for prescribing",
        [
            "Handbook NVH-HB-REN, edition 2, January 2026, NVH Renal Pharmacy Service. "
            "This handbook gives general principles. Drug-specific renal doses are in each "
            "drug monograph.",
            "NVH laboratories report eGFR using the CKD-EPI 2021 equation, in mL/min/1.73 m2. "
            "eGFR is valid only when kidney function is stable. It overestimates function in "
            "AKI and in people with low muscle mass (amputees, frailty, long ICU stays).",
            "Use creatinine clearance (CrCl) from the Cockcroft-Gault equation instead of eGFR for "
            "drugs with a narrow therapeutic index (aminoglycosides, vancomycin, digoxin, lithium) "
            "and for all patients aged 75 or over. Use actual body weight, except when BMI is above "
            "30: then use adjusted body weight (ideal weight + 0.4 x (actual - ideal)).",
            "CKD stages by eGFR:",
            "- G1: 90 or above (with other evidence of kidney damage)",
            "- G2: 60-89",
            "- G3a: 45-59",
            "- G3b: 30-44",
            "- G4: 15-29",
            "- G5: below 15, or on dialysis",
            "Recheck U&E within 72 hours of starting any drug that needs renal dose adjustment, and "
            "within 24 hours if the patient is acutely unwell. Ask the renal pharmacist (ext. 3370) "
            "when two estimates give doses in different bands.",
        ],
    ),
    (
        "Page 2. Acute kidney injury and sick day rules",
        [
            "AKI stages (KDIGO), based on the rise in serum creatinine from baseline or on urine "
            "output:",
            "- Stage 1: creatinine 1.5-1.9 x baseline, or a rise of 26 micromol/L or more in 48 "
            "hours, or urine output below 0.5 mL/kg/h for 6-12 hours",
            "- Stage 2: creatinine 2.0-2.9 x baseline, or urine output below 0.5 mL/kg/h for 12 "
            "hours or more",
            "- Stage 3: creatinine 3 x baseline or more, or above 354 micromol/L, or RRT started, "
            "or urine output below 0.3 mL/kg/h for 24 hours",
            "In AKI, review every drug on the MAR within 6 hours of the AKI alert. Withhold the "
            "drugs in the SADMANS list until creatinine returns to within 20% of baseline:",
            "- S: sulfonylureas (hypoglycaemia)",
            "- A: ACE inhibitors",
            "- D: diuretics",
            "- M: metformin",
            "- A: angiotensin receptor blockers (ARBs)",
            "- N: NSAIDs",
            "- S: SGLT2 inhibitors (ketoacidosis risk)",
            "Sick day rules for patients at home: during vomiting, diarrhoea or fever with poor "
            "fluid intake, pause SADMANS drugs and restart them 24-48 hours after eating and "
            "drinking normally again. Give every patient starting one of these drugs the NVH "
            "sick day rules card.",
            "Avoid iodinated contrast within 72 hours of a previous dose where possible, and give "
            "IV fluid (1 mL/kg/h of 0.9% sodium chloride for 12 hours before and after) when eGFR "
            "is below 30.",
        ],
    ),
    (
        "Page 3. Dialysis and timing of doses",
        [
            "Haemodialysis (HD) at NVH runs on a Monday-Wednesday-Friday or "
            "Tuesday-Thursday-Saturday schedule, in 4-hour sessions. Check the patient's dialysis "
            "days before writing once-daily or less frequent doses.",
            "- Drugs removed by dialysis (most beta-lactams, gabapentin, levetiracetam): give the "
            "dose after the session on dialysis days.",
            "- Vancomycin: take the pre-dialysis level; the renal team redoses according to it.",
            "- Antihypertensives: consider omitting the morning dose on dialysis days if the "
            "patient has had low BP during sessions.",
            "- Erythropoiesis-stimulating agents and IV iron are given by the dialysis unit; do "
            "not prescribe them on the ward chart.",
            "Peritoneal dialysis (PD): most drugs are dosed as for eGFR below 15. Intraperitoneal "
            "antibiotics for PD peritonitis are prescribed only by the renal team.",
            "Continuous renal replacement therapy (CRRT) in the ICU removes many drugs far more "
            "than intermittent HD. Doses are set daily with the ICU pharmacist, and levels are "
            "used wherever an assay exists.",
            "Fluid: do not give maintenance IV fluid to anuric dialysis patients without renal "
            "advice; the usual limit is 500 mL per day plus the previous day's urine output.",
            "Contacts: renal pharmacist ext. 3370 (weekdays 08:30-17:00); renal registrar on call "
            "via switchboard (ext. 0) at all other times.",
        ],
    ),
]

# --------------------------------------------------------------------------------------------
# DOCX: Anticoagulation protocol. (style, text) pairs; style None is a normal paragraph,
# "bullet" is a List Bullet paragraph.
# --------------------------------------------------------------------------------------------
DOCX_TITLE = "NVH Anticoagulation protocol"
DOCX_BLOCKS: list[tuple[str | None, str]] = [
    ("Heading 1", DOCX_TITLE),
    (None, NOTICE),
    (None, "Protocol NVH-PRO-ANT, version 5, effective 1 December 2025. Applies to adult "
           "inpatients. Doses of Hemarovin by indication and eGFR are in the Hemarovin monograph; "
           "VTE prophylaxis is in the VTE protocol."),
    ("Heading 1", "1. Starting anticoagulation"),
    ("Heading 2", "Choosing an agent"),
    ("bullet", "Hemarovin is first choice for non-valvular AF and for DVT/PE treatment."),
    ("bullet", "Warfarin is used for mechanical heart valves, moderate-to-severe mitral stenosis, "
               "antiphospholipid syndrome and eGFR below 15."),
    ("bullet", "LMWH is used in pregnancy, active cancer with VTE, and when oral intake is unreliable."),
    ("Heading 2", "Warfarin initiation and INR targets"),
    ("bullet", "Slow loading: 5 mg once daily at 18:00 for 4 days, then dose by the INR on day 5. "
               "Use 3 mg daily if aged over 75, weight below 50 kg, or liver disease."),
    ("bullet", "Target INR 2.5 (range 2.0-3.0) for AF and VTE."),
    ("bullet", "Target INR 3.5 (range 3.0-4.0) for a mechanical mitral valve."),
    ("bullet", "Check the INR at least twice weekly until stable on two consecutive readings, "
               "then refer to the anticoagulation clinic before discharge."),
    ("Heading 2", "Unfractionated heparin infusion"),
    ("bullet", "Loading dose 80 units/kg IV, then 18 units/kg/h."),
    ("bullet", "Target APTT ratio 1.5-2.5. Check the APTT 6 hours after starting and 6 hours after "
               "every rate change."),
    ("bullet", "Check platelets on alternate days from day 4 to day 14 (HIT screening)."),
    ("Heading 1", "2. Procedures and surgery"),
    ("Heading 2", "Stopping Hemarovin before a procedure"),
    ("bullet", "Low bleeding risk: last dose 24 hours before if eGFR is 50 or above; 36 hours "
               "before if eGFR is 30-49."),
    ("bullet", "High bleeding risk: last dose 48 hours before if eGFR is 50 or above; 72 hours "
               "before if eGFR is 30-49."),
    ("bullet", "Spinal or epidural anaesthesia: last dose at least 72 hours before, whatever the eGFR."),
    ("bullet", "No bridging with LMWH is needed for Hemarovin."),
    ("Heading 2", "Stopping warfarin and bridging"),
    ("bullet", "Stop warfarin 5 days before the procedure. Check the INR the day before; if it is "
               "above 1.5, give vitamin K 1 mg orally and recheck on the morning of surgery."),
    ("bullet", "Bridge with treatment-dose LMWH only for a mechanical mitral valve, VTE within the "
               "last 3 months, or stroke within the last 3 months. Give the last LMWH dose 24 "
               "hours before surgery."),
    ("Heading 2", "Restarting after a procedure"),
    ("bullet", "Restart Hemarovin 24 hours after a low bleeding risk procedure and 48-72 hours after "
               "a high bleeding risk procedure, once haemostasis is secure."),
    ("bullet", "Until then, give prophylactic-dose LMWH from 6-8 hours after surgery if the "
               "surgeon agrees."),
    ("bullet", "Restart warfarin at the usual dose on the evening of surgery if the patient can "
               "swallow."),
    ("Heading 1", "3. Bleeding and reversal"),
    ("Heading 2", "Major bleeding on warfarin"),
    ("bullet", "Stop warfarin. Give vitamin K 10 mg IV."),
    ("bullet", "Give prothrombin complex concentrate (PCC): 25 units/kg if INR is 2-4, 35 units/kg "
               "if INR is 4-6, 50 units/kg if INR is above 6."),
    ("bullet", "Recheck the INR 30 minutes after PCC."),
    ("Heading 2", "Major bleeding on Hemarovin"),
    ("bullet", "Record the time of the last dose; send FBC, U&E and a Hemarovin-calibrated anti-Xa "
               "level."),
    ("bullet", "Specific reversal agent: Antarovin (fictional) 500 mg IV over 10 minutes, then an "
               "infusion of 4 mg/min for 2 hours. If Antarovin is not available, give PCC 50 units/kg."),
    ("bullet", "Give tranexamic acid 1 g IV over 10 minutes."),
    ("bullet", "Call the on-call haematologist through switchboard for every major bleed."),
    ("Heading 2", "Minor bleeding"),
    ("bullet", "Apply local measures and withhold one dose. Check haemoglobin and look for a cause "
               "before restarting; do not stop anticoagulation for more than 48 hours without "
               "senior review."),
]


def build_pdf(path: Path) -> None:
    from fpdf import FPDF

    class Handbook(FPDF):
        def header(self) -> None:
            self.set_font("Helvetica", "B", 9)
            self.cell(0, 5, PDF_TITLE + " - FICTIONAL DEMO, NOT MEDICAL ADVICE", new_x="LMARGIN", new_y="NEXT")
            self.ln(3)

        def footer(self) -> None:
            self.set_y(-15)
            self.set_font("Helvetica", "", 9)
            self.cell(0, 10, f"Page {self.page_no()} of {{nb}}", align="C")

    pdf = Handbook(format="A4")
    pdf.set_creation_date(FIXED_DATE)
    pdf.set_title(PDF_TITLE)
    pdf.set_author("Northwind Valley Health (fictional)")
    pdf.set_subject("Renal dosing principles - ragtune demo")
    pdf.set_creator("ragtune scripts/make_demo_docs.py")
    pdf.set_auto_page_break(auto=True, margin=20)

    for number, (title, paragraphs) in enumerate(PDF_PAGES, start=1):
        pdf.add_page()
        if number == 1:
            pdf.set_font("Helvetica", "B", 18)
            pdf.multi_cell(0, 9, PDF_TITLE, new_x="LMARGIN", new_y="NEXT")
            pdf.set_font("Helvetica", "I", 10)
            pdf.multi_cell(0, 5, NOTICE, new_x="LMARGIN", new_y="NEXT")
            pdf.ln(4)
        pdf.set_font("Helvetica", "B", 14)
        pdf.multi_cell(0, 7, title, new_x="LMARGIN", new_y="NEXT")
        pdf.ln(2)
        pdf.set_font("Helvetica", "", 11)
        for text in paragraphs:
            if text.startswith("- "):
                pdf.set_x(pdf.l_margin + 5)
                pdf.multi_cell(0, 6, "* " + text[2:], new_x="LMARGIN", new_y="NEXT")
            else:
                pdf.multi_cell(0, 6, text, new_x="LMARGIN", new_y="NEXT")
                pdf.ln(2)
        if pdf.page_no() != number:
            raise RuntimeError(f"PDF topic {number} overflowed onto another page; shorten it")

    path.parent.mkdir(parents=True, exist_ok=True)
    pdf.output(str(path))


def _normalise_zip(data: bytes) -> bytes:
    """Rewrite a zip archive with fixed entry timestamps so the output is byte-identical."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            fixed = zipfile.ZipInfo(info.filename, date_time=(2026, 1, 1, 0, 0, 0))
            fixed.compress_type = zipfile.ZIP_DEFLATED
            fixed.external_attr = 0o644 << 16
            dst.writestr(fixed, src.read(info.filename))
    return out.getvalue()


def build_docx(path: Path) -> None:
    import docx

    document = docx.Document()
    props = document.core_properties
    props.title = DOCX_TITLE
    props.subject = "Anticoagulation - ragtune demo"
    props.author = "Northwind Valley Health (fictional)"
    props.last_modified_by = "Northwind Valley Health (fictional)"
    props.comments = NOTICE
    props.keywords = "fictional; demo; anticoagulation"
    props.revision = 1
    props.created = FIXED_DATE.replace(tzinfo=None)
    props.modified = FIXED_DATE.replace(tzinfo=None)
    props.last_printed = FIXED_DATE.replace(tzinfo=None)

    for style, text in DOCX_BLOCKS:
        if style is None:
            document.add_paragraph(text)
        elif style == "bullet":
            document.add_paragraph(text, style="List Bullet")
        else:
            document.add_paragraph(text, style=style)

    buffer = io.BytesIO()
    document.save(buffer)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_normalise_zip(buffer.getvalue()))


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        print(__doc__, file=sys.stderr)
        return 2
    out_dir = Path(argv[0]) if argv else Path("data/demo")
    pdf_path = out_dir / "handbooks" / "renal-dosing-handbook.pdf"
    docx_path = out_dir / "handbooks" / "anticoagulation-protocol.docx"
    build_pdf(pdf_path)
    build_docx(docx_path)
    print(f"wrote {pdf_path}")
    print(f"wrote {docx_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
